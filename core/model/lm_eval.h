// Per-token comparison of a quantized language model with its FP reference, accumulated per
// evaluation unit (a document, or a window of a stream) into the sufficient statistics the
// slice bootstrap resamples (FAIRNESS.md §3, §4.1; core/slices.h).
//
// For a scored position t of a window with token ids y[0..T-1], row t-1 of each logits matrix
// predicts y[t]. With log-softmax computed stably (ℓ_i = x_i - m - log Σ_j e^{x_j - m}, m = max_j
// x_j; the terms e^{x_j - m} in float by core/detmath, their sum, the logarithm and everything
// after in double), the per-token quantities are
//   nll_q = -ℓq_y, nll_fp = -ℓfp_y,
//   KL(P_FP ‖ P_Q) = Σ_i e^{ℓfp_i} (ℓfp_i - ℓq_i)        (clamped at 0: only rounding makes it < 0)
//   top1 = argmax of the float logits (ties -> lowest id), correct = (top1 == y),
//   agree = (top1_q == top1_fp), c2w = correct_fp ∧ ¬correct_q, w2c = ¬correct_fp ∧ correct_q,
//   dp = e^{ℓq_y} - e^{ℓfp_y}.
// When both logits rows are bitwise equal every Q quantity equals its FP twin bitwise, KL and
// dp are exactly 0, so every paired delta of lm_metric_defs() is exactly 0.
//
// Each unit's row holds blocks of kLmBlockSize columns (LmColumn order): block 0 sums all of
// its scored tokens, then one block per frequency bucket of the target token y, then one block
// per position bucket of t. unit_table() declares them to the bootstrap as the token families
// "token_freq" and "position" (UnitTable::block_size = kLmBlockSize).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "core/slices.h"
#include "core/tensor.h"

namespace ql {

/// Columns of one block of LM sufficient statistics.
enum LmColumn : int {
  kLmTokens = 0,   ///< scored tokens
  kLmNllQ,         ///< Σ nll_q (nats)
  kLmNllFp,        ///< Σ nll_fp
  kLmKl,           ///< Σ KL(P_FP ‖ P_Q)
  kLmAgree,        ///< # top1_q == top1_fp
  kLmCorrectQ,     ///< # top1_q == y
  kLmCorrectFp,    ///< # top1_fp == y
  kLmC2w,          ///< # correct_fp ∧ ¬correct_q
  kLmW2c,          ///< # ¬correct_fp ∧ correct_q
  kLmDp,           ///< Σ (p_q(y) - p_fp(y))
  kLmDp2,          ///< Σ (p_q(y) - p_fp(y))²
  kLmBlockSize     ///< number of columns in a block (11)
};
/// "n_tokens", "sum_nll_q", "sum_nll_fp", "sum_kl", "n_agree", "n_correct_q", "n_correct_fp",
/// "n_c2w", "n_w2c", "sum_dp", "sum_dp2".
const char* lm_column_name(int column);

/// Slice family keys of the token families built by LmEvalAccumulator::unit_table().
inline constexpr const char* kTokenFreqFamily = "token_freq";
inline constexpr const char* kPositionFamily = "position";

/// The quantities of one scored token (see the file comment).
struct LmTokenStats {
  double nll_q = 0, nll_fp = 0, kl = 0;
  double p_q = 0, p_fp = 0;  ///< probability of the target
  int32_t top1_q = 0, top1_fp = 0;
  bool correct_q = false, correct_fp = false, agree = false;
};

/// Score one token: fp_row / q_row are `vocab` logits predicting `target` (0 <= target < vocab,
/// vocab >= 1; the caller checks). Throws NumericError if a logit is not finite. Thread-safe.
LmTokenStats lm_score_token(const float* fp_row, const float* q_row, Index vocab, int32_t target);

/// Point quantiles of the per-token KL in one slice (no CI: a quantile of correlated tokens
/// has no paired ratio-of-sums estimator; see FAIRNESS §4.1).
struct KlSliceQuantiles {
  std::string slice_key, slice_value;  ///< as in SliceRow ("__all__" for the overall row)
  int64_t n_tokens = 0;
  double median = 0, p99 = 0;          ///< NaN when the slice has no tokens
};

/// Accumulates LM comparison statistics window by window.
///
/// Determinism: each window's statistics are summed in token order and stored under its
/// caller-chosen window index; unit_table() adds the windows of a unit in ascending window
/// index. With the indexed add_window() results are therefore bitwise independent of the thread
/// count, of the order in which windows are added and of how windows are split between
/// accumulators that are merged.
///
/// Thread safety: add_window() may be called concurrently from an OpenMP loop (the scoring
/// runs outside the lock; the bucket functions must be safe to call concurrently). It throws
/// on bad input, so wrap it in ParallelErrors inside a parallel region. merge(), unit_table()
/// and the quantile functions must not run concurrently with add_window() on the same objects.
class LmEvalAccumulator {
 public:
  /// Units are 0..n_units-1. freq_bucket(y) gives the frequency bucket (an index into
  /// freq_bucket_names) of a target token id; pos_bucket(t) the position bucket of a scored
  /// position t (the index within the window, i.e. the number of context tokens before the
  /// target). Both name lists must be non-empty and free of duplicates. Throws ConfigError.
  LmEvalAccumulator(int n_units, std::vector<std::string> freq_bucket_names,
                    std::function<int(int32_t)> freq_bucket,
                    std::vector<std::string> pos_bucket_names,
                    std::function<int(int64_t)> pos_bucket);
  LmEvalAccumulator(LmEvalAccumulator&&) = default;  ///< movable, not copyable (owns a mutex)
  LmEvalAccumulator& operator=(LmEvalAccumulator&&) = default;

  /// Score one window of unit `unit`: ids has T tokens, logits_fp and logits_q are T x vocab
  /// (row t predicts ids[t+1]; the last row is not used). Positions first_scored..T-1 are
  /// scored (1 <= first_scored <= T; first_scored = T scores nothing but still registers the
  /// window), e.g. first_scored = 1 for the golden protocol, T/2 for half-window scoring.
  /// `window` is any index unique within this accumulator and every one merged into it.
  /// Throws ShapeError (shapes, ids outside the vocabulary, unit out of range, a bucket
  /// function returning an index outside its names), NumericError (non-finite logit in a
  /// scored row), Error (window index already added).
  void add_window(int64_t window, int unit, const std::vector<int32_t>& ids,
                  const Matrix& logits_fp, const Matrix& logits_q, int64_t first_scored = 1);

  /// Sequential form: the window index is one past the largest index added so far (0 for the
  /// first), so windows are reduced in call order. Not for concurrent callers (the index would
  /// depend on the schedule); use the indexed form there.
  void add_window(int unit, const std::vector<int32_t>& ids, const Matrix& logits_fp,
                  const Matrix& logits_q, int64_t first_scored = 1);

  /// Take over other's windows (other is left unchanged). Both must have the same n_units and
  /// bucket names; window indices must be disjoint. Throws Error otherwise.
  void merge(const LmEvalAccumulator& other);

  /// The per-unit table for evaluate_slices(): columns block 0 = lm_column_name(c), then
  /// "token_freq=<name>/<column>" per frequency bucket, then "position=<name>/<column>" per
  /// position bucket; block_size = kLmBlockSize; token_column "n_tokens"; token families
  /// "token_freq" and "position" in the bucket names' order. unit_ids has n_units entries and
  /// attrs[k] too (ShapeError otherwise). Units without windows have all-zero rows.
  UnitTable unit_table(std::vector<std::string> unit_ids, std::vector<std::string> attr_keys,
                       std::vector<std::vector<std::string>> attrs) const;

  /// KL median and p99 (quantile_linear) of the scored tokens of every slice, in the row
  /// order of evaluate_slices(units, ...): overall, each design family of `units` (values
  /// sorted), then token_freq and position (declared order). `units` supplies the design
  /// attributes and must have n_units units (normally the table from unit_table()).
  std::vector<KlSliceQuantiles> kl_quantiles(const UnitTable& units) const;

  /// The q-quantile (quantile_linear) of the KL of the tokens for which keep(unit, freq
  /// bucket, position bucket) is true; NaN if none is kept.
  double kl_quantile(const std::function<bool(int unit, int freq_bucket, int pos_bucket)>& keep,
                     double q) const;

  /// {{"kl_median", ...}, {"kl_p99", ...}} over all scored tokens (the overall row of
  /// kl_quantiles()); NaN without tokens.
  std::vector<std::pair<std::string, double>> kl_quantiles_overall() const;

  int n_units() const { return n_units_; }
  const std::vector<std::string>& freq_bucket_names() const { return freq_names_; }
  const std::vector<std::string>& pos_bucket_names() const { return pos_names_; }
  int64_t n_windows() const { return static_cast<int64_t>(windows_.size()); }
  int64_t scored_tokens() const;  ///< over all windows
  int n_blocks() const { return 1 + static_cast<int>(freq_names_.size() + pos_names_.size()); }

 private:
  struct Window {
    int unit = 0;
    std::vector<double> sums;  // n_blocks() * kLmBlockSize, block-major
    std::vector<float> kl;     // per scored token, in position order
    std::vector<int32_t> freq, pos;  // bucket of each scored token
  };

  int n_units_ = 0;
  std::vector<std::string> freq_names_, pos_names_;
  std::function<int(int32_t)> freq_bucket_;
  std::function<int(int64_t)> pos_bucket_;
  Window score_window(const std::string& where, int unit, const std::vector<int32_t>& ids,
                      const Matrix& logits_fp, const Matrix& logits_q,
                      int64_t first_scored) const;

  std::map<int64_t, Window> windows_;  // ordered: the reduction order
  std::unique_ptr<std::mutex> mu_;
};

/// Metrics over one block of LmColumn statistics (use with a table from unit_table()):
///   ppl        exp(Σnll_q/n)  vs exp(Σnll_fp/n)       lower is better
///   nll        Σnll_q/n       vs Σnll_fp/n (delta = ln(PPL_Q/PPL_FP))   lower
///   kl_mean    ΣKL/n          vs 0 (KL of FP from itself)               lower
///   top1_agree n_agree/n      vs 1                                      higher
///   flip_rate  1 - n_agree/n  vs 0                                      lower
///   acc        n_correct_q/n  vs n_correct_fp/n (top-1 vs gold)         higher
///   c2w_rate   n_c2w/n        vs 0                                      lower
///   w2c_rate   n_w2c/n        vs 0 (a correction by quantization)       higher
///   mean_dp    Σdp/n          vs 0 (change in p of the gold token)      higher
///   rms_dp     sqrt(Σdp²/n)   vs 0                                      lower
/// A block with n = 0 gives NaN value and reference.
std::vector<SliceMetricDef> lm_metric_defs();

}  // namespace ql
