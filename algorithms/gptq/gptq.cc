#include "algorithms/gptq/gptq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "algorithms/algorithm.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/parallel.h"
#include "core/quantize.h"

namespace ql {
namespace {

/// Column panels of the triangular inverse. Fixed: it sets the summation order, so changing
/// it changes U in the last bits.
constexpr Index kTile = kFactorTile;
/// Columns per sub-block of the column loop: inside a lazy-update block, columns are processed
/// in sub-blocks whose updates to the rest of the block are one small GEMM, so the scalar
/// recurrence only spans kSub columns. Fixed, like kTile.
constexpr Index kSub = 16;
/// Smallest accepted Cholesky pivot, relative to mean diag H: fp32's epsilon 2^-23. A pivot
/// below it describes a direction the fp32 column loop cannot resolve (its inverse would
/// amplify rounding by > 1/eps); singular Hessians land here in double instead of going
/// negative as they do in fp32.
constexpr double kPivotFloor = 1.1920928955078125e-07;
/// Element count below which plain loops (no BLAS inside) stay serial: a parallel region costs
/// more than it saves there, a lot more on a loaded machine.
constexpr Index kParallelMinElems = 1 << 16;

// ------------------------------------------------------------------------------------------
// Factorisation, double precision, fixed tiles. Every tile call (core/linalg.h) is
// single-threaded and its bounds do not depend on the thread count; so the factors do not
// either.
// ------------------------------------------------------------------------------------------

/// U = J L⁻¹ J in fp32 (J the index reversal), from L's lower triangle. L⁻¹ is computed in
/// column panels of width kTile, each one TRSM on an identity panel (column j of L⁻¹ is zero
/// above row j, so panel p solves only rows >= its first column); each task writes its own
/// columns of U.
void reversed_inverse(const MatrixD& L, Matrix& U) {
  const Index n = L.rows();
  U.resize(n, n);
  const Index panels = (n + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic, 1)
  for (Index p = 0; p < panels; ++p) {
    const Index j0 = p * kTile, wb = std::min(kTile, n - j0), m = n - j0;
    std::vector<double> T(static_cast<size_t>(m * wb), 0.0);
    for (Index c = 0; c < wb; ++c) T[c * wb + c] = 1.0;
    trsm_left_lower(m, wb, L.data() + j0 * n + j0, n, T.data(), wb);
    // U(a, b) = (L⁻¹)(n-1-a, n-1-b): this panel's columns j = j0 + c are U's columns n-1-j.
    for (Index a = 0; a < n; ++a) {
      const Index i = n - 1 - a;
      float* u = U.data() + a * n + (n - j0 - wb);  // U(a, n-1-(j0+wb-1)) .. U(a, n-1-j0)
      for (Index c = 0; c < wb; ++c) {
        const Index j = j0 + c;
        u[wb - 1 - c] = i >= j ? static_cast<float>(T[(i - j0) * wb + c]) : 0.0f;
      }
    }
  }
}

/// The factors of H_d = P H Pᵀ + λI, with P the processing order (row a of P H Pᵀ is input
/// column perm[a]) and diag[c] replacing H's diagonal (dead columns): U upper with
/// H_d⁻¹ = UᵀU (GPTQ's "Cholesky of the inverse", §2.1 step 6) and, when R is given, R upper
/// with H_d = R Rᵀ. chol(J H_d J) = L gives H_d = (JLJ)(JLJ)ᵀ, so R = JLJ and U = R⁻¹ =
/// J L⁻¹ J, both upper with a positive diagonal, hence the unique factors.
/// NotPositiveDefinite when the factorisation fails (see kPivotFloor); NotFinite when H has a
/// NaN or Inf (checked here, on the one pass that reads all of H).
enum class FactorStatus { Ok, NotPositiveDefinite, NotFinite };
FactorStatus factor(const Matrix& Hu, const std::vector<Index>& perm,
                    const std::vector<float>& diag, double lambda, double min_pivot, Matrix& U,
                    Matrix* R) {
  const Index n = Hu.rows();
  MatrixD A(n, n);
  const bool par = n * n >= kParallelMinElems;
  bool finite = true;
  // A(i, j) = H_d(n-1-i, n-1-j), lower triangle only, from the upper triangle Hu of the
  // symmetric H (every off-diagonal pair is read once; without act-order the reversal maps
  // A's rows onto Hu's rows, read backwards).
#pragma omp parallel for schedule(static) if (par) reduction(&& : finite)
  for (Index i = 0; i < n; ++i) {
    const Index ci = perm[n - 1 - i];
    double* ai = A.data() + i * n;
    float bad = 0.0f;  // stays 0 iff every value is finite (inf - inf and NaN propagate)
    for (Index j = 0; j < i; ++j) {
      const Index cj = perm[n - 1 - j];
      const float v = ci <= cj ? Hu(ci, cj) : Hu(cj, ci);
      bad += v - v;
      ai[j] = static_cast<double>(v);
    }
    bad += diag[ci] - diag[ci];
    finite = finite && bad == 0.0f;
    ai[i] = static_cast<double>(diag[ci]) + lambda;
  }
  if (!finite) return FactorStatus::NotFinite;
  if (!cholesky_lower_blocked(A, min_pivot)) return FactorStatus::NotPositiveDefinite;
  if (R) {
    R->resize(n, n);
#pragma omp parallel for schedule(static) if (par)
    for (Index i = 0; i < n; ++i) {
      float* r = R->data() + i * n;
      for (Index j = 0; j < i; ++j) r[j] = 0.0f;
      for (Index j = i; j < n; ++j) r[j] = static_cast<float>(A(n - 1 - i, n - 1 - j));
    }
  }
  reversed_inverse(A, U);
  return FactorStatus::Ok;
}

// ------------------------------------------------------------------------------------------
// Column loop
// ------------------------------------------------------------------------------------------

/// Where the grid of weight (r, p) (p = position in the processing order) comes from.
enum class GridMode { Tensor, Channel, StaticGroups, DynamicGroups };

/// End of the lazy-update block (or sub-block) that starts at i1: at most B columns and not
/// past `limit`. With dynamic groups of size g, a group that starts inside the block must also
/// end inside it, since its grid is fitted on fully updated columns; otherwise the block ends
/// where that group starts.
Index block_end(Index i1, Index limit, Index B, Index g, Index d) {
  Index i2 = std::min(i1 + B, limit);
  if (g > 0) {
    const Index s = ((i2 - 1) / g) * g;  // last group start before i2
    if (s > i1 && std::min(s + g, d) > i2) i2 = s;
  }
  return i2;
}

struct LoopState {
  Matrix* W;        ///< d_out x d working weights, processing order (consumed)
  const Matrix* U;  ///< d x d upper factor of H_d⁻¹
  const QuantSpec* spec;
  GridMode mode;
  const std::vector<Index>* perm;  ///< processing position -> original column
  IntMatrix* codes;                ///< d_out x d, processing order
  Matrix* scales;                  ///< grid layout of QuantizedTensor (groups in processing order
  Matrix* zeros;                   ///< for DynamicGroups, original order for StaticGroups)
  std::vector<double>* err2;       ///< per row Σ err²
  /// DynamicGroups: fit a group that starts inside a block on the weights as they were at the
  /// block start (the reference's behaviour) instead of the fully updated ones.
  bool fit_block_start = false;
};

/// GPTQ's column loop (§2.1 steps 7-8) on fixed panels of kPanelRows rows. Rows are
/// independent given U and the grids, so each panel runs all blocks on its own. Inside a block
/// [i1, i2), sub-blocks [s1, s2) of kSub columns are copied transposed (one contiguous vector
/// of the panel's rows per column) and run the OBS recurrence column by column across all rows
/// at once; one GEMM W[:, s2:i2] -= Err[:, s1:s2] · U[s1:s2, s2:i2] carries a sub-block to the
/// rest of the block, and after the block one GEMM W[:, i2:] -= Err · U[i1:i2, i2:] (the lazy
/// batch update). Both levels are the column-by-column update, regrouped. Processed columns of
/// W are left stale: the caller reconstructs the weights from the codes.
void column_loop(const LoopState& st, Index B) {
  Matrix& W = *st.W;
  const Matrix& U = *st.U;
  const QuantSpec& spec = *st.spec;
  const Index rows = W.rows(), d = W.cols();
  const Index g = spec.granularity == Granularity::PerGroup ? spec.group_size : 0;
  const bool dynamic = st.mode == GridMode::DynamicGroups;
  const bool snapshot = dynamic && st.fit_block_start;
  // Blocks are shaped around groups only when a group's grid must see every earlier update.
  const Index gdyn = dynamic && !snapshot ? g : 0;
  const Index panels = (rows + kPanelRows - 1) / kPanelRows;
  const int qmin = spec.qmin(), qmax = spec.qmax();
  ParallelErrors errs;
#pragma omp parallel for schedule(dynamic, 1)
  for (Index pnl = 0; pnl < panels; ++pnl) {
    errs.run(pnl, [&] {
      const Index r0 = pnl * kPanelRows, pr = std::min(kPanelRows, rows - r0);
      std::vector<float> err(static_cast<size_t>(pr * std::min(B, d)));
      std::vector<float> T(static_cast<size_t>(kSub * pr));  // T[k*pr + i] = W(r0+i, s1+k)
      std::vector<float> q(static_cast<size_t>(pr)), e(static_cast<size_t>(pr));
      std::vector<int32_t> c(static_cast<size_t>(pr));
      std::vector<double> loss(static_cast<size_t>(pr), 0.0);
      std::vector<Grid> grids(static_cast<size_t>(pr));
      // With fit_block_start: W[panel, i1 : i2 + g) as it was when block [i1, i2) started.
      const Index slen = snapshot ? std::min(B, d) + g : 0;
      std::vector<float> snap(static_cast<size_t>(pr * slen));
      auto grid_at = [&](Index gr, Index gc) {
        return Grid{(*st.scales)(gr, gc), (*st.zeros)(gr, gc), qmin, qmax};
      };
      if (st.mode == GridMode::Tensor || st.mode == GridMode::Channel)
        for (Index i = 0; i < pr; ++i)
          grids[i] = grid_at(st.mode == GridMode::Tensor ? 0 : r0 + i, 0);
      for (Index i1 = 0, i2; i1 < d; i1 = i2) {
        i2 = block_end(i1, d, B, gdyn, d);
        const Index bk = i2 - i1;
        if (snapshot)
          for (Index i = 0; i < pr; ++i) {
            const float* w = W.data() + (r0 + i) * d;
            std::copy(w + i1, w + std::min(d, i2 + g), snap.data() + i * slen);
          }
        for (Index s1 = i1, s2; s1 < i2; s1 = s2) {
          s2 = block_end(s1, i2, kSub, gdyn, d);
          const Index ns = s2 - s1;
          for (Index i = 0; i < pr; ++i) {
            const float* w = W.data() + (r0 + i) * d + s1;
            for (Index k = 0; k < ns; ++k) T[k * pr + i] = w[k];
          }
          for (Index j = s1; j < s2; ++j) {
            float* t = T.data() + (j - s1) * pr;
            if (st.mode == GridMode::StaticGroups) {
              const Index gc = (*st.perm)[j] / g;
              for (Index i = 0; i < pr; ++i) grids[i] = grid_at(r0 + i, gc);
            } else if (st.mode == GridMode::DynamicGroups && j % g == 0) {
              // Fitted on the current, fully updated W[r, j:j+g]: at a sub-block start W itself
              // is current; a group starting later lies inside the sub-block (block_end), in T.
              const Index len = std::min(g, d - j), gc = j / g;
              for (Index i = 0; i < pr; ++i) {
                if (snapshot)
                  grids[i] = fit_grid(snap.data() + i * slen + (j - i1), len, 1, spec);
                else
                  grids[i] = j == s1 ? fit_grid(W.data() + (r0 + i) * d + j, len, 1, spec)
                                     : fit_grid(t + i, len, pr, spec);
                (*st.scales)(r0 + i, gc) = grids[i].scale;
                (*st.zeros)(r0 + i, gc) = grids[i].zero;
              }
            }
            quantize_with_grids(t, pr, 1, grids.data(), c.data(), q.data(), 1);
            // err = (w - q) / U_jj for every row, then the OBS update of the sub-block's later
            // columns: W[:, k] -= err U[j, k].
            const float ujj = U(j, j);
            for (Index i = 0; i < pr; ++i) {
              const float ei = (t[i] - q[i]) / ujj;
              e[i] = ei;
              err[i * bk + (j - i1)] = ei;
              st.codes->data()[(r0 + i) * d + j] = c[i];
              loss[i] += static_cast<double>(ei) * static_cast<double>(ei);
            }
            const float* urow = U.data() + j * d;
            for (Index k = j + 1; k < s2; ++k) {
              float* tk = T.data() + (k - s1) * pr;
              const float u = urow[k];
              for (Index i = 0; i < pr; ++i) tk[i] -= e[i] * u;
            }
          }
          if (s2 < i2)
            gemm(Trans::No, Trans::No, pr, i2 - s2, ns, -1.0f, err.data() + (s1 - i1), bk,
                 U.data() + s1 * d + s2, d, 1.0f, W.data() + r0 * d + s2, d);
        }
        if (i2 < d)
          gemm(Trans::No, Trans::No, pr, d - i2, bk, -1.0f, err.data(), bk,
               U.data() + i1 * d + i2, d, 1.0f, W.data() + r0 * d + i2, d);
      }
      for (Index i = 0; i < pr; ++i) (*st.err2)[r0 + i] = loss[i];
    });
  }
  errs.rethrow();
}

/// For each matrix in `srcs` (all d_out x d): Σ over rows a of (Σ_j (A R)_aj² - λ Σ_j A_aj²),
/// i.e. Σ_a a (H_d - λI) aᵀ = tr(A H Aᵀ), with the rows taken in processing order (columns
/// perm, dead columns zeroed). One fp32 TRMM per fixed panel; sums in double, per row and then
/// rows in order.
std::vector<double> quadratic_forms(const std::vector<const Matrix*>& srcs,
                                    const std::vector<Index>& perm, const std::vector<char>& dead,
                                    const Matrix& R, double lambda) {
  const Index rows = srcs.front()->rows(), d = srcs.front()->cols();
  const Index panels = (rows + kPanelRows - 1) / kPanelRows;
  const Index tasks = panels * static_cast<Index>(srcs.size());
  std::vector<double> per_row(static_cast<size_t>(rows * srcs.size()));
#pragma omp parallel for schedule(dynamic, 1)
  for (Index t = 0; t < tasks; ++t) {
    const Matrix& src = *srcs[t / panels];
    const Index r0 = (t % panels) * kPanelRows, pr = std::min(kPanelRows, rows - r0);
    double* out = per_row.data() + (t / panels) * rows + r0;
    Matrix a(pr, d);
    std::vector<double> norm2(static_cast<size_t>(pr));
    for (Index i = 0; i < pr; ++i) {
      double s = 0.0;
      for (Index p = 0; p < d; ++p) {
        const Index c = perm[p];
        const float v = dead[c] ? 0.0f : src(r0 + i, c);
        a(i, p) = v;
        s += static_cast<double>(v) * v;
      }
      norm2[i] = s;
    }
    trmm_right_upper(pr, d, R.data(), d, a.data(), d);
    for (Index i = 0; i < pr; ++i) {
      double s = 0.0;
      for (Index p = 0; p < d; ++p) s += static_cast<double>(a(i, p)) * a(i, p);
      out[i] = s - lambda * norm2[i];
    }
  }
  std::vector<double> sums(srcs.size(), 0.0);
  for (size_t m = 0; m < srcs.size(); ++m)
    for (Index r = 0; r < rows; ++r) sums[m] += per_row[m * rows + r];
  return sums;
}

double ordered_sum(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return s;
}

std::string join_values(const std::vector<double>& v) {
  std::string s;
  for (double x : v) s += (s.empty() ? "" : ", ") + format_double(x);
  return s;
}

// ------------------------------------------------------------------------------------------
// The plugin
// ------------------------------------------------------------------------------------------

/// Dead columns, the diagonal with dead entries replaced, and the processing order.
struct Columns {
  std::vector<char> dead;
  std::vector<float> diag;
  std::vector<Index> perm;
  double mean_diag = 0.0;
};

Columns prepare_columns(const Matrix& Hu, bool act_order) {
  const Index d = Hu.rows();
  Columns c;
  // §2.1 step 2: dead inputs carry no information; their columns are zeroed and decoupled.
  c.dead.assign(static_cast<size_t>(d), 0);
  double live_sum = 0.0;
  Index live = 0;
  for (Index j = 0; j < d; ++j) {
    if (Hu(j, j) == 0.0f) {
      c.dead[j] = 1;
    } else {
      live_sum += Hu(j, j);
      ++live;
    }
  }
  const float dead_diag = live > 0 ? static_cast<float>(live_sum / live) : 1.0f;
  c.diag.resize(static_cast<size_t>(d));
  for (Index j = 0; j < d; ++j) c.diag[j] = c.dead[j] ? dead_diag : Hu(j, j);
  // Step 4: act-order permutes by descending diag H (ties keep index order).
  c.perm.resize(static_cast<size_t>(d));
  std::iota(c.perm.begin(), c.perm.end(), Index{0});
  if (act_order)
    std::stable_sort(c.perm.begin(), c.perm.end(), [&](Index a, Index b) { return c.diag[a] > c.diag[b]; });
  for (Index j = 0; j < d; ++j) c.mean_diag += c.diag[j];
  c.mean_diag /= static_cast<double>(d);
  return c;
}

struct Damping {
  double percdamp = -1.0, lambda = 0.0;
  std::vector<double> tried;
};

/// Steps 5-6 with escalating damping (ALGORITHMS.md §2.5, §10): the first percdamp of the
/// schedule whose factorisation succeeds. NumericError naming the layer otherwise.
Damping factor_damped(const Matrix& Hu, const Columns& c, const GptqOptions& opt, const std::string& name,
                      Matrix& U, Matrix* R) {
  Damping dmp;
  std::vector<double> schedule{opt.percdamp};
  for (double v : opt.damp_schedule)
    if (v > schedule.back()) schedule.push_back(v);
  for (double pd : schedule) {
    dmp.tried.push_back(pd);
    dmp.lambda = pd * c.mean_diag;
    const FactorStatus status = factor(Hu, c.perm, c.diag, dmp.lambda, kPivotFloor * c.mean_diag, U, R);
    if (status == FactorStatus::NotFinite)
      throw NumericError("layer '" + name +
                         "': gptq: the calibration Hessian contains NaN or Inf (check the "
                         "calibration inputs)");
    if (status == FactorStatus::Ok) {
      dmp.percdamp = pd;
      return dmp;
    }
  }
  throw NumericError("layer '" + name +
                     "': gptq: the damped Hessian is not positive definite (Cholesky failed "
                     "with percdamp " +
                     join_values(dmp.tried) +
                     "); use more or other calibration data, check for duplicate "
                     "calibration rows, or raise percdamp / damp_schedule");
}

/// The grids fixed before the column loop (per tensor and per channel on the incoming W,
/// static groups on the dead-zeroed W in original order, as the reference) and the working
/// weights in processing order with dead columns zeroed.
void initial_grids(const Matrix& W0, const QuantSpec& spec, GridMode mode, const Columns& cols,
                   QuantizedTensor& qt, Matrix& Wp) {
  const Index rows = W0.rows(), d = W0.cols();
  const Index g = spec.granularity == Granularity::PerGroup ? spec.group_size : 0;
  const Index n_groups = g > 0 ? (d + g - 1) / g : 1;
  qt.spec = spec;
  qt.scales.resize(mode == GridMode::Tensor ? 1 : rows, n_groups);
  qt.zeros.resize(qt.scales.rows(), qt.scales.cols());
  if (mode == GridMode::Tensor) {
    const Grid t = fit_grid(W0.data(), W0.size(), 1, spec);
    qt.scales(0, 0) = t.scale;
    qt.zeros(0, 0) = t.zero;
  }
  Wp.resize(rows, d);
  ParallelErrors errs;
#pragma omp parallel for schedule(static) if (rows * d >= kParallelMinElems)
  for (Index r = 0; r < rows; ++r) {
    errs.run(r, [&] {
      if (mode == GridMode::Channel) {
        const Grid c = fit_grid(W0.data() + r * d, d, 1, spec);
        qt.scales(r, 0) = c.scale;
        qt.zeros(r, 0) = c.zero;
      }
      if (mode == GridMode::StaticGroups) {  // step 3
        std::vector<float> row(static_cast<size_t>(d));
        for (Index c = 0; c < d; ++c) row[c] = cols.dead[c] ? 0.0f : W0(r, c);
        for (Index k = 0; k < n_groups; ++k) {
          const Grid s = fit_grid(row.data() + k * g, std::min(g, d - k * g), 1, spec);
          qt.scales(r, k) = s.scale;
          qt.zeros(r, k) = s.zero;
        }
      }
      for (Index p = 0; p < d; ++p) Wp(r, p) = cols.dead[cols.perm[p]] ? 0.0f : W0(r, cols.perm[p]);
    });
  }
  errs.rethrow();
}

/// rtn_rel_err_h, gptq_rel_err_h and gain_vs_rtn under the undamped H: tr(A H Aᵀ) =
/// ‖A R‖² - λ‖A‖² (H_d = R Rᵀ). GPTQ's own numerator needs no product: the OBS increments sum
/// to the objective under H_d, Σ err² = tr(ΔW H_d ΔWᵀ) (§2.1), so tr(ΔW H ΔWᵀ) = Σ err² -
/// λ‖ΔW‖² (dead columns of ΔW are 0 in the working weights and carry no weight under H).
void compare_with_rtn(const Matrix& W0, const Matrix& Wq, const QuantSpec& spec, const Columns& cols,
                      const Matrix& R, double lambda, double sum_err2, Diagnostics& diag) {
  const Index rows = W0.rows(), d = W0.cols();
  const QuantizedTensor rq = quantize(W0, spec);
  const Matrix dW_rtn = W0 - dequantize(rq);
  const std::vector<double> forms = quadratic_forms({&W0, &dW_rtn}, cols.perm, cols.dead, R, lambda);
  const double den = forms[0], num_rtn = forms[1];
  std::vector<double> dw2(static_cast<size_t>(rows));
  for (Index r = 0; r < rows; ++r) {
    double s = 0.0;
    for (Index c = 0; c < d; ++c)
      if (!cols.dead[c]) {
        const double e = static_cast<double>(W0(r, c)) - Wq(r, c);
        s += e * e;
      }
    dw2[r] = s;
  }
  const double num_gptq = sum_err2 - lambda * ordered_sum(dw2);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double rtn_rel = den > 0 ? num_rtn / den : nan;
  const double gptq_rel = den > 0 ? num_gptq / den : nan;
  diag.emplace_back("rtn_rel_err_h", rtn_rel);
  diag.emplace_back("gptq_rel_err_h", gptq_rel);
  diag.emplace_back("gain_vs_rtn", gptq_rel > 0 ? rtn_rel / gptq_rel : nan);
}

}  // namespace

GptqResult gptq_solve(const Matrix& W0, const Matrix& Hu, const QuantSpec& spec, const GptqOptions& opt,
                      const std::string& name) {
  if (!spec.quantized()) throw Error("layer '" + name + "': gptq_solve needs a quantized grid (bits < 16)");
  if (Hu.rows() != W0.cols() || Hu.cols() != W0.cols())
    throw ShapeError("layer '" + name + "': gptq: Hessian is " + std::to_string(Hu.rows()) + "x" +
                     std::to_string(Hu.cols()) + " for " + std::to_string(W0.cols()) + " input channels");
  const auto t0 = std::chrono::steady_clock::now();
  const Index rows = W0.rows(), d = W0.cols();
  const Columns cols = prepare_columns(Hu, opt.act_order);
  Matrix U, R;
  const Damping dmp = factor_damped(Hu, cols, opt, name, U, opt.compare_rtn ? &R : nullptr);

  GridMode mode = GridMode::Channel;
  if (spec.granularity == Granularity::PerTensor) mode = GridMode::Tensor;
  if (spec.granularity == Granularity::PerGroup)
    mode = opt.static_groups ? GridMode::StaticGroups : GridMode::DynamicGroups;
  GptqResult out;
  QuantizedTensor& qt = out.quantized;
  Matrix Wp;
  initial_grids(W0, spec, mode, cols, qt, Wp);

  // Without act-order the processing order is the original one and codes go straight out.
  IntMatrix codes_perm;
  IntMatrix& codes = opt.act_order ? codes_perm : qt.codes;
  codes.resize(rows, d);
  std::vector<double> err2(static_cast<size_t>(rows), 0.0);
  LoopState st{&Wp, &U, &spec, mode, &cols.perm, &codes, &qt.scales, &qt.zeros, &err2};
  st.fit_block_start = opt.group_fit == GptqGroupFit::BlockStart;
  column_loop(st, opt.blocksize);
  U.resize(0, 0);
  Wp.resize(0, 0);

  // Step 9: back to the original column order.
  if (opt.act_order) {
    qt.codes.resize(rows, d);
#pragma omp parallel for schedule(static) if (rows * d >= kParallelMinElems)
    for (Index r = 0; r < rows; ++r)
      for (Index p = 0; p < d; ++p) qt.codes(r, cols.perm[p]) = codes_perm(r, p);
  }
  if (opt.act_order && mode == GridMode::DynamicGroups) {
    qt.g_idx.resize(static_cast<size_t>(d));
    for (Index p = 0; p < d; ++p) qt.g_idx[cols.perm[p]] = static_cast<int32_t>(p / spec.group_size);
  }
  out.W = dequantize(qt);
  const double sum_err2 = ordered_sum(err2);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.diagnostics.emplace_back("gptq_loss", 0.5 * sum_err2);
  out.diagnostics.emplace_back("damping_used", dmp.percdamp);
  out.diagnostics.emplace_back("cholesky_retries", static_cast<double>(dmp.tried.size() - 1));
  if (opt.compare_rtn) compare_with_rtn(W0, out.W, spec, cols, R, dmp.lambda, sum_err2, out.diagnostics);
  out.diagnostics.emplace_back("seconds", seconds);
  return out;
}

namespace {

// ------------------------------------------------------------------------------------------
// The plugin
// ------------------------------------------------------------------------------------------

class Gptq final : public LayerAlgorithm {
 public:
  explicit Gptq(GptqOptions o) : opt_(std::move(o)) {}

 private:
  LayerOutput quantize_layer(const LayerInput& in) const override;
  GptqOptions opt_;
};

LayerOutput Gptq::quantize_layer(const LayerInput& in) const {
  const GptqOptions& opt = opt_;
  // GPTQ already weighs the error by the full Hessian; its grid fits take no importance.
  if (in.spec.mse_weights != MseWeights::None)
    throw ConfigError(SourceLoc{}, "mse_weights",
                      "'" + in.name + "': gptq weighs errors by the full Hessian; mse_weights imatrix is for rtn");
  LayerOutput out;
  if (!in.spec.quantized()) {  // bits: 16 keeps the layer in float, as for rtn
    out.W = *in.W;
    return out;
  }
  if (!in.hessian || in.hessian->count() == 0)
    throw ConfigError(SourceLoc{}, "calib",
                      "layer '" + in.name +
                          "': gptq needs calibration data (the Hessian of the layer input), "
                          "but none was collected");
  GptqResult r = gptq_solve(*in.W, in.hessian->upper_triangle(), in.spec, opt, in.name);
  out.W = std::move(r.W);
  out.quantized = std::move(r.quantized);
  out.diagnostics = std::move(r.diagnostics);
  return out;
}

}  // namespace

ConfigNode damp_schedule_node(const std::vector<double>& v) {
  ConfigNode s = ConfigNode::sequence();
  for (double x : v) s.push_back(ConfigNode::scalar(format_double(x)));
  return s;
}

void parse_damp_schedule(GptqOptions& o, const ConfigNode& n, const std::string& path) {
  if (!n.is_sequence())
    throw ConfigError(n.loc(), path,
                      "expected a list of numbers in (0, 1], found '" + n.to_flow() + "'");
  std::vector<double> v;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const ConfigNode& item = n.at(i);
    const std::string p = join_path(path, std::to_string(i));
    const double x = read_double(item, p, 0.0, 1.0);
    if (!(x > 0.0))
      throw ConfigError(item.loc(), p, "expected a number in (0, 1], found '" + item.value() + "'");
    if (!v.empty() && !(x > v.back()))
      throw ConfigError(item.loc(), p,
                        "expected values in increasing order, found " + item.value() + " after " +
                            format_double(v.back()));
    v.push_back(x);
  }
  o.damp_schedule = std::move(v);
}

void register_gptq(AlgorithmRegistry& registry) {
  auto schema = std::make_shared<OptionSchema<GptqOptions>>();
  add_gptq_options(*schema);
  AlgorithmInfo info;
  info.name = "gptq";
  info.scope = Scope::Layer;
  info.summary = "Hessian-based column-by-column quantization with error feedback (OBS updates)";
  info.paper =
      "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained "
      "Transformers, arXiv 2210.17323";
  info.uses_weight_spec = true;
  info.options = schema;
  info.needs.hessian = true;
  info.make = [](const std::any& o) { return std::make_unique<Gptq>(std::any_cast<const GptqOptions&>(o)); };
  registry.add(std::move(info));
}

}  // namespace ql
