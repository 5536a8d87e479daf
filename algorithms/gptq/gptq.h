// gptq: "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
// (Frantar, Ashkboos, Hoefler, Alistarh), arXiv 2210.17323. ALGORITHMS.md §2.
//
// Idea: quantize a linear layer's input columns one at a time in a fixed order shared by all
// rows; after each column, move its rounding error onto the not-yet-quantized columns with the
// optimal-brain-surgeon update under the layer Hessian H = E[x xᵀ], so the layer output error
// tr(ΔW H ΔWᵀ) stays small. The sequence of inverse Hessians is read off the rows of the upper
// Cholesky factor U of H⁻¹, and updates are applied lazily in blocks of B columns (one GEMM per
// block).
//
// Config keys (besides the step's weight grid: bits, scheme, granularity, group_size, range,
// ...): percdamp, blocksize, act_order, static_groups, damp_schedule, group_fit, compare_rtn
// (see GptqOptions). The runner's calib.true_sequential controls the stage order inside a block.
//
// Steps, in order (ALGORITHMS.md §2.1): H from the calibration statistics; dead columns
// (diag 0) are zeroed; static group grids (optional) are fitted on that W; act-order
// (optional) permutes columns by descending diag H; H += λI with λ = percdamp · mean diag H;
// U = upper Cholesky factor of H⁻¹; the column loop; the inverse permutation.
//
// Cost (d_out = d_in = 4096, 2 threads, bench/bench_gptq): about 1.8x one sgemm of that size,
// of which the factorisation (double) is ~0.85x and the lazy updates (fp32 GEMMs) ~0.55x. Rows
// are processed in fixed panels of kPanelRows (core/linalg.h); inside a block, sub-blocks of 16
// columns run the OBS recurrence and reach the rest of the block through one small GEMM.
//
// Deliberate differences from the reference implementation (IST-DASLab/gptq):
// - Factorisation in double. U is obtained as R⁻¹ from one Cholesky factorisation H = R Rᵀ
//   with R upper (a Cholesky of the index-reversed H), not as chol(cholesky_inverse(chol(H)));
//   the two are equal in exact arithmetic (uniqueness of the Cholesky factor) and this form
//   never forms H⁻¹ explicitly. The factorisation is blocked with fixed tiles, so U does not
//   depend on the thread count. The column loop and the lazy GEMM updates are fp32, as in the
//   reference.
// - "Cholesky failure" means a pivot not above 2⁻²³ · mean diag H (the fp32 resolution at the
//   Hessian's scale), or not finite: in double a singular H often yields tiny positive pivots
//   whose inverse would wreck the fp32 loop. A failure is not fatal: damping escalates through
//   damp_schedule, and only an exhausted schedule throws NumericError naming the layer.
// - A dead column gets H_jj = mean of the live diagonal (the reference sets 1). The column is
//   decoupled from the others either way; the reference's literal 1 would make λ depend on
//   the scale of H (quantlab's H is XᵀX/n, the reference's 2XᵀX/n_sequences).
// - Dynamic groups are fitted on the fully updated W[:, j:j+g] (group_fit: updated, the
//   default): block boundaries are moved so that a group starting inside a block also ends
//   inside it, and the result does not depend on B beyond float rounding. The reference fits a
//   group that starts inside a block on the weights as they were at the block start (group
//   size 64 with B = 128, say); group_fit: block_start does the same.
// - Per-channel and per-tensor grids are fitted on the incoming W before dead columns are
//   zeroed, as the reference does; they are static by construction, so static_groups matters
//   only with granularity group.
#pragma once
#include <string>
#include <vector>

#include "algorithms/algorithm.h"

namespace ql {

/// Which weights a dynamic group's grid is fitted on (see GptqOptions::group_fit).
enum class GptqGroupFit { Updated, BlockStart };

/// The gptq step's own options (YAML keys of the same names).
struct GptqOptions {
  /// Damping λ = percdamp · mean(diag H) added to H's diagonal. In [0, 1].
  double percdamp = 0.01;
  /// Lazy-update block size B (columns per deferred GEMM). >= 1.
  int blocksize = 128;
  /// Quantize columns in order of descending diag H (dynamic groups then follow that order and
  /// the codes carry a per-column group index g_idx).
  bool act_order = false;
  /// Fit every group's grid on the (dead-column-zeroed) W before any update, in the original
  /// column order, so act-order needs no g_idx.
  bool static_groups = false;
  /// percdamp values tried in order when the Cholesky factorisation fails; strictly increasing,
  /// each in (0, 1]; values not above percdamp are not tried.
  std::vector<double> damp_schedule{0.03, 0.1};
  /// Dynamic groups: Updated fits each group's grid on the fully updated W[:, j:j+g] (ALGORITHMS.md
  /// §2.1 step 7; the result does not depend on blocksize). BlockStart fits a group that starts
  /// inside a lazy block on the weights as they were when that block started, as the reference
  /// code does (it slices the full W, which has not yet received the block's updates); the two
  /// differ only when group starts are not block starts (e.g. g64 with B = 128).
  GptqGroupFit group_fit = GptqGroupFit::Updated;
  /// Also quantize the layer with RTN on the same grid and report rtn_rel_err_h,
  /// gptq_rel_err_h and gain_vs_rtn. tr(A H Aᵀ) is evaluated as ‖A R‖² - λ‖A‖² with
  /// H + λI = R Rᵀ (two triangular products, together the flops of one d_out x d_in x d_in
  /// GEMM: measured 1.2x an sgemm of that size, on top of GPTQ's own 1.8x); GPTQ's own
  /// numerator needs no product (Σ_j err_j² = tr(ΔW (H + λI) ΔWᵀ), the OBS increments).
  bool compare_rtn = true;
};

/// What gptq_solve returns: the dequantized weights, their codes and grids, and the
/// diagnostics listed at register_gptq.
struct GptqResult {
  Matrix W;
  QuantizedTensor quantized;
  Diagnostics diagnostics;
};

/// The GPTQ solver (§2.1) on one weight matrix W (d_out x d_in) under a symmetric positive
/// semi-definite Hessian given by its upper triangle H_upper (d_in x d_in; the lower triangle
/// is not read): H = XᵀX / n from a HessianAccumulator, or any reweighting of it (VLMQ's
/// XᵀGX). spec must be quantized (bits < 16). Callable by other plugins; `name` labels
/// errors. Throws ShapeError for mismatched shapes and NumericError as the plugin does.
/// Deterministic for any thread count (fixed tiles, core/linalg.h).
GptqResult gptq_solve(const Matrix& W, const Matrix& H_upper, const QuantSpec& spec,
                      const GptqOptions& options, const std::string& name);

void parse_damp_schedule(GptqOptions& o, const ConfigNode& n, const std::string& path);
ConfigNode damp_schedule_node(const std::vector<double>& v);

/// gptq's option keys (percdamp, blocksize, act_order, static_groups, damp_schedule, group_fit,
/// compare_rtn) on the schema of a plugin whose options derive from GptqOptions: VLMQ runs the
/// same solver on another Hessian and takes the same keys.
template <class T>
void add_gptq_options(OptionSchema<T>& s) {
  s.add("percdamp", static_cast<double T::*>(&GptqOptions::percdamp),
        "damping added to diag H as a fraction of its mean (first value tried)", {0, 1})
      .add("blocksize", static_cast<int T::*>(&GptqOptions::blocksize),
           "lazy-update block size B: columns per deferred GEMM", {1, 1 << 20})
      .add("act_order", static_cast<bool T::*>(&GptqOptions::act_order),
           "quantize columns in order of descending diag H (dynamic groups then store g_idx)")
      .add("static_groups", static_cast<bool T::*>(&GptqOptions::static_groups),
           "fit all group grids on the weights before any update (granularity group)")
      .add_custom(
          "damp_schedule", "list of floats",
          "percdamp values tried in order after a failed Cholesky (increasing, each in "
          "(0, 1]; values not above percdamp are skipped); [] = fail at once",
          [](T& o, const ConfigNode& n, const std::string& p) { parse_damp_schedule(o, n, p); },
          [](const T& o) { return damp_schedule_node(o.damp_schedule); })
      .add_enum("group_fit", static_cast<GptqGroupFit T::*>(&GptqOptions::group_fit),
                "dynamic groups: fit each grid on the fully updated weights (updated: result "
                "independent of blocksize) or, for a group starting inside a block, on the "
                "weights as they were at the block start (block_start: IST-DASLab/gptq's "
                "behaviour, to reproduce its numbers)",
                std::vector<std::pair<std::string, GptqGroupFit>>{{"updated", GptqGroupFit::Updated},
                                                                  {"block_start", GptqGroupFit::BlockStart}})
      .add("compare_rtn", static_cast<bool T::*>(&GptqOptions::compare_rtn),
           "also report RTN's and GPTQ's error under H and the gain over RTN (one extra "
           "layer-sized product)");
}

/// Registers "gptq" (layer scope). Diagnostics per layer:
///   gptq_loss         ½ Σ (w - q)² / U_jj², i.e. ½ tr(ΔW (H + λI) ΔWᵀ) with H = XᵀX/n
///   damping_used      the percdamp of the successful factorisation
///   cholesky_retries  failed factorisations before it
///   rtn_rel_err_h, gptq_rel_err_h   tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of RTN and GPTQ (compare_rtn)
///   gain_vs_rtn       rtn_rel_err_h / gptq_rel_err_h (compare_rtn)
///   seconds           GPTQ's own time (factorisation + column loop; not the RTN comparison)
/// Throws ConfigError (key 'calib') when the layer has no calibration Hessian, NumericError
/// when H is not finite or the damping schedule is exhausted.
/// Thread safety: the plugin is stateless; one call uses OpenMP internally and its results do
/// not depend on the thread count.
void register_gptq(AlgorithmRegistry& registry);

}  // namespace ql
