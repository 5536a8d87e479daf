// Slice metrics with a paired, clustered, stratified bootstrap (FAIRNESS.md §3-4).
//
// Evaluation data are *units* (documents; for synthetic suites, fixed-size token groups), each
// with design attributes (slice families such as `population` or `source`) and additive
// sufficient statistics (sums). Every metric is a function of column totals over a set of
// units, for the evaluated (quantized) variant and for the FP reference on the same units, so a
// replicate recomputes both on the same resample (paired) and the delta's CI carries the
// covariance. Units are resampled, never tokens.
//
// Token slices (FAIRNESS §3 item 3): frequency or position buckets cut across units, since
// every unit contributes tokens to every bucket. They are described by column *blocks*: with
// block_size > 0 every metric is written against one block of block_size columns; the overall
// row and the design-slice rows pass totals + 0 (the all-tokens block), and the token-slice row
// (key, values[v]) passes the all-unit totals + offsets[v] (that bucket's block). Token slices
// therefore use the same replicate index sets as everything else, and their deltas, gaps and
// disparity summaries are paired too.
//
// Replicates: one index set per replicate b, shared by every slice, metric and variant. With
// stratify = true the units are resampled within each cell (the intersection of all design
// attributes), keeping design sizes; otherwise i.i.d. over all units (fairlearn's scheme). Draw
// j of cell c in replicate b is CounterRng(seed, mix_stream(b, c)).below(j, n_c), so results
// are bitwise identical for any thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ql {

/// A token slice family: value v's statistics are the block of columns starting at offsets[v].
struct TokenFamily {
  std::string key;                  ///< e.g. "token_freq"; must differ from every attr_key
  std::vector<std::string> values;  ///< reported in this order (not sorted); distinct
  std::vector<Index> offsets;       ///< column of each value's block; offsets.size() == values.size()
};

struct UnitTable {
  std::vector<std::string> unit_ids;
  std::vector<std::string> attr_keys;             ///< slice families
  std::vector<std::vector<std::string>> attrs;    ///< attrs[k][u]: value of family k for unit u
  std::vector<std::string> columns;               ///< names of the sufficient statistics
  MatrixD sums;                                   ///< units x columns
  /// Name of the column that counts tokens (reported as n_tokens, used for flags). With
  /// block_size > 0 it must lie in the first block: its index is then the index *within* a
  /// block, read at offset 0 for overall/design rows and at offsets[v] for token rows.
  std::string token_column = "n_tokens";
  /// 0: metrics see all columns and there are no token families (the design-only behaviour).
  /// > 0: metrics see one block [offset, offset + block_size); the all-tokens block is at 0.
  Index block_size = 0;
  /// Token slice families (need block_size > 0 and a token_column). Every block must fit in
  /// `columns`. Their rows follow the design families' rows; n_units of a token-slice row is
  /// the number of units with a non-zero token count in that bucket.
  std::vector<TokenFamily> token_families;

  Index n_units() const { return static_cast<Index>(unit_ids.size()); }
  Index column(const std::string& name) const;  ///< throws Error if absent
};

/// A metric computed from column totals: a pointer to totals in `UnitTable::columns` order, or,
/// when block_size > 0, to the first column of one block (see UnitTable::block_size).
struct SliceMetricDef {
  std::string name;
  bool higher_is_better = false;
  std::function<double(const double* totals)> value;      ///< evaluated variant
  std::function<double(const double* totals)> reference;  ///< FP reference; empty = no delta
};

struct BootstrapOptions {
  int n_boot = 1000;          ///< replicates; 0 disables CIs (NaN bounds)
  uint64_t seed = 0;
  double ci_level = 0.95;     ///< percentile interval
  bool stratify = true;
  int64_t min_units = 20;     ///< below: flag few_units (FAIRNESS §4.3 few_clusters)
  int64_t min_tokens = 2000;  ///< below: flag few_tokens
};

enum SliceFlag : uint32_t {
  kFlagFewUnits = 1u << 0,
  kFlagFewTokens = 1u << 1,
  kFlagImprecise = 1u << 2,   ///< CI half-width > 50% of |delta|
  kFlagEmpty = 1u << 3,       ///< no units in the slice (values NaN)
};
std::string flags_to_string(uint32_t flags);  ///< "few_units|few_tokens" or ""

/// One (metric, slice) row. slice_key "__all__" / slice_value "__all__" is the overall row.
struct SliceRow {
  std::string metric, slice_key, slice_value;
  int64_t n_units = 0, n_tokens = 0;
  double value = 0, ci_low = 0, ci_high = 0;
  double ref_value = 0;                          ///< FP reference on the same units (NaN if none)
  double delta = 0, delta_ci_low = 0, delta_ci_high = 0;  ///< value - ref_value, paired CI
  uint32_t flags = 0;
};

/// One disparity summary of a (metric, slice family), on the levels or on the paired deltas:
/// worst (the worst slice's value; "worst" by the metric's direction), gap_between (max - min),
/// gap_to_overall (max |slice - overall|), ratio_min_max (min/max folded to <= 1; NaN if signs
/// differ or max is 0), amplification (gap_between(variant) - gap_between(reference), levels
/// only). Each is recomputed on every replicate for its CI; p_worst is the share of replicates
/// in which the observed worst slice is still the worst. The family's slices are those with a
/// value in the point estimate (an empty slice is left out, not NaN for the whole family);
/// families with fewer than two such slices have no summaries.
struct DisparityRow {
  std::string metric, slice_key, summary, on;
  std::string worst_slice;
  double value = 0, ci_low = 0, ci_high = 0, p_worst = 0;
};

struct SliceReport {
  std::vector<SliceRow> rows;
  std::vector<DisparityRow> disparity;
};

/// Evaluate every metric overall and per value of every slice family, with CIs and disparity
/// summaries (design and token families alike). Rows are ordered per metric: overall, then
/// each design family in attr_keys order with its values sorted, then each token family in
/// declared order with its values in declared order. A slice absent from a replicate (no
/// drawn unit; for a token slice, no drawn unit with tokens in the bucket) is NaN there and
/// ignored by that row's percentiles. Throws ShapeError for an inconsistent table (including
/// a malformed block layout), ConfigError for bad options.
SliceReport evaluate_slices(const UnitTable& units, const std::vector<SliceMetricDef>& metrics,
                            const BootstrapOptions& opts);

/// The q-quantile (q in [0, 1]) with linear interpolation between order statistics (numpy's
/// default "linear" method) over the non-NaN entries; NaN when there are none. The engine's
/// percentile CIs use it; callers use it for point quantiles such as the KL p99.
double quantile_linear(std::vector<double> v, double q);

}  // namespace ql
