#include "core/slices.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

#include "core/error.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace ql {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Where every unit and slice lives. Groups are the distinct tuples of all design attribute
// values in lexicographic order (the design cells). Slices are indexed 0 = overall, then per
// design family in attr_keys order with values sorted, then per token family in declared
// order with values in declared order. Only overall and design slices own a row of totals; a
// token slice reads the overall row at its block's column offset.
struct Family {
  std::string key;
  std::vector<std::string> values;
  int slice_offset = 0;  // slice index of values[0]
};

struct Layout {
  Index n_units = 0, n_cols = 0;
  int n_groups = 0;
  std::vector<int> group_of;                     // unit -> group
  std::vector<std::vector<Index>> group_units;   // group -> units, in unit order
  std::vector<std::vector<int>> value_of_group;  // [design family][group] -> value index
  std::vector<Family> families;                  // design families, then token families
  size_t n_design_families = 0;
  int n_design_slices = 1;                       // overall + design slices: rows of totals
  int n_slices = 1;
  int n_token_slices = 0;
  std::vector<int> total_row;                    // [slice] -> row of totals it reads
  std::vector<Index> col_offset;                 // [slice] -> first column of its block
  Index tok_col = -1;                            // token column within a block (or table)
  std::vector<uint8_t> has_tokens;               // [unit * n_token_slices + t]: bucket non-empty
};

Layout make_layout(const UnitTable& t) {
  Layout L;
  L.n_units = t.n_units();
  L.n_cols = static_cast<Index>(t.columns.size());
  L.tok_col = t.token_column.empty() ? -1 : t.column(t.token_column);
  const size_t K = t.attr_keys.size();

  L.n_design_families = K;
  for (size_t k = 0; k < K; ++k) {
    std::vector<std::string> v = t.attrs[k];
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    Family f;
    f.key = t.attr_keys[k];
    f.values = std::move(v);
    f.slice_offset = L.n_slices;
    L.n_slices += static_cast<int>(f.values.size());
    L.families.push_back(std::move(f));
  }
  L.n_design_slices = L.n_slices;
  L.total_row.resize(static_cast<size_t>(L.n_slices));
  for (int s = 0; s < L.n_slices; ++s) L.total_row[static_cast<size_t>(s)] = s;
  L.col_offset.assign(static_cast<size_t>(L.n_slices), 0);
  for (const auto& tf : t.token_families) {
    Family f;
    f.key = tf.key;
    f.values = tf.values;
    f.slice_offset = L.n_slices;
    L.n_slices += static_cast<int>(f.values.size());
    for (Index off : tf.offsets) {
      L.total_row.push_back(0);
      L.col_offset.push_back(off);
    }
    L.families.push_back(std::move(f));
  }
  L.n_token_slices = L.n_slices - L.n_design_slices;
  if (L.n_token_slices > 0) {
    const size_t NT = static_cast<size_t>(L.n_token_slices);
    L.has_tokens.resize(static_cast<size_t>(L.n_units) * NT);
    for (Index u = 0; u < L.n_units; ++u) {
      for (size_t i = 0; i < NT; ++i) {
        const Index c = L.col_offset[static_cast<size_t>(L.n_design_slices) + i] + L.tok_col;
        L.has_tokens[static_cast<size_t>(u) * NT + i] = t.sums(u, c) != 0.0 ? 1 : 0;
      }
    }
  }

  std::map<std::vector<std::string>, int> cell_index;  // ordered: lexicographic by tuple
  for (Index u = 0; u < L.n_units; ++u) {
    std::vector<std::string> key(K);
    for (size_t k = 0; k < K; ++k) key[k] = t.attrs[k][static_cast<size_t>(u)];
    cell_index.emplace(std::move(key), 0);
  }
  L.n_groups = static_cast<int>(cell_index.size());
  L.value_of_group.assign(K, std::vector<int>(static_cast<size_t>(L.n_groups)));
  int g = 0;
  for (auto& [key, idx] : cell_index) {
    idx = g;
    for (size_t k = 0; k < K; ++k) {
      const auto& vals = L.families[k].values;
      L.value_of_group[k][static_cast<size_t>(g)] =
          static_cast<int>(std::lower_bound(vals.begin(), vals.end(), key[k]) - vals.begin());
    }
    ++g;
  }
  L.group_of.resize(static_cast<size_t>(L.n_units));
  L.group_units.resize(static_cast<size_t>(L.n_groups));
  for (Index u = 0; u < L.n_units; ++u) {
    std::vector<std::string> key(K);
    for (size_t k = 0; k < K; ++k) key[k] = t.attrs[k][static_cast<size_t>(u)];
    const int gu = cell_index.at(key);
    L.group_of[static_cast<size_t>(u)] = gu;
    L.group_units[static_cast<size_t>(gu)].push_back(u);
  }
  return L;
}

// Scratch for one resample: per-group column totals, draw counts and counts of drawn units
// with tokens in each token slice, then per-slice ones.
struct Totals {
  std::vector<double> group, slice;  // row-major: [group|design slice][column]
  std::vector<int64_t> group_n, group_tok_n, slice_n;  // group_tok_n: [group][token slice]

  explicit Totals(const Layout& L)
      : group(static_cast<size_t>(L.n_groups * L.n_cols)),
        slice(static_cast<size_t>(L.n_design_slices * L.n_cols)),
        group_n(static_cast<size_t>(L.n_groups)),
        group_tok_n(static_cast<size_t>(L.n_groups) * static_cast<size_t>(L.n_token_slices)),
        slice_n(static_cast<size_t>(L.n_slices)) {}

  void clear_groups() {
    std::fill(group.begin(), group.end(), 0.0);
    std::fill(group_n.begin(), group_n.end(), 0);
    std::fill(group_tok_n.begin(), group_tok_n.end(), 0);
  }

  void add_unit(const Layout& L, const MatrixD& sums, Index u) {
    const int g = L.group_of[static_cast<size_t>(u)];
    const double* src = sums.data() + u * L.n_cols;
    double* dst = group.data() + static_cast<size_t>(g) * static_cast<size_t>(L.n_cols);
    for (Index c = 0; c < L.n_cols; ++c) dst[c] += src[c];
    ++group_n[static_cast<size_t>(g)];
    const size_t NT = static_cast<size_t>(L.n_token_slices);
    if (NT > 0) {
      const uint8_t* has = L.has_tokens.data() + static_cast<size_t>(u) * NT;
      int64_t* cnt = group_tok_n.data() + static_cast<size_t>(g) * NT;
      for (size_t i = 0; i < NT; ++i) cnt[i] += has[i];
    }
  }

  // Slice totals are sums of group totals in group order, so their rounding is fixed.
  void groups_to_slices(const Layout& L) {
    std::fill(slice.begin(), slice.end(), 0.0);
    std::fill(slice_n.begin(), slice_n.end(), 0);
    const size_t C = static_cast<size_t>(L.n_cols);
    const size_t NT = static_cast<size_t>(L.n_token_slices);
    auto add_to = [&](int s, int g) {
      const double* src = group.data() + static_cast<size_t>(g) * C;
      double* dst = slice.data() + static_cast<size_t>(s) * C;
      for (size_t c = 0; c < C; ++c) dst[c] += src[c];
      slice_n[static_cast<size_t>(s)] += group_n[static_cast<size_t>(g)];
    };
    for (int g = 0; g < L.n_groups; ++g) {
      add_to(0, g);
      for (size_t k = 0; k < L.n_design_families; ++k)
        add_to(L.families[k].slice_offset + L.value_of_group[k][static_cast<size_t>(g)], g);
      for (size_t i = 0; i < NT; ++i)
        slice_n[static_cast<size_t>(L.n_design_slices) + i] +=
            group_tok_n[static_cast<size_t>(g) * NT + i];
    }
  }

  // The first column a metric of slice s reads.
  const double* at(const Layout& L, size_t s) const {
    return slice.data() + static_cast<size_t>(L.total_row[s]) * static_cast<size_t>(L.n_cols) +
           static_cast<size_t>(L.col_offset[s]);
  }
};

// val/ref[m * S + s]; NaN for a slice absent from this resample.
void eval_metrics(const Layout& L, const Totals& T, const std::vector<SliceMetricDef>& metrics,
                  double* val, double* ref) {
  const size_t S = static_cast<size_t>(L.n_slices);
  for (size_t m = 0; m < metrics.size(); ++m) {
    for (size_t s = 0; s < S; ++s) {
      const double* tot = T.at(L, s);
      const bool present = T.slice_n[s] > 0;
      val[m * S + s] = present ? metrics[m].value(tot) : kNaN;
      ref[m * S + s] = present && metrics[m].reference ? metrics[m].reference(tot) : kNaN;
    }
  }
}

enum LevelSummary { kWorst, kGapBetween, kGapToOverall, kRatioMinMax, kAmplification, kNLevel };
enum DeltaSummary { kDWorst, kDGapBetween, kDGapToOverall, kNDelta };
const char* const kLevelNames[kNLevel] = {"worst", "gap_between", "gap_to_overall",
                                          "ratio_min_max", "amplification"};
const char* const kDeltaNames[kNDelta] = {"worst", "gap_between", "gap_to_overall"};

struct FamilySummary {
  double level[kNLevel];
  double delta[kNDelta];
  int level_worst = -1, delta_worst = -1;  // value index of the worst slice, -1 if undefined
};

bool any_nan(const std::vector<double>& v) {
  return std::any_of(v.begin(), v.end(), [](double x) { return std::isnan(x); });
}

// Index of the worst entry: the largest when lower is better, the smallest when higher is
// better; ties go to the first (sorted) slice.
int worst_index(const std::vector<double>& v, bool higher_is_better) {
  int w = 0;
  for (int i = 1; i < static_cast<int>(v.size()); ++i) {
    const bool worse = higher_is_better ? v[static_cast<size_t>(i)] < v[static_cast<size_t>(w)]
                                        : v[static_cast<size_t>(i)] > v[static_cast<size_t>(w)];
    if (worse) w = i;
  }
  return w;
}

double gap_between(const std::vector<double>& v) {
  const auto mm = std::minmax_element(v.begin(), v.end());
  return *mm.second - *mm.first;
}

double gap_to_overall(const std::vector<double>& v, double overall) {
  double g = 0.0;
  for (double x : v) g = std::max(g, std::fabs(x - overall));
  return std::isnan(overall) ? kNaN : g;
}

// min/max folded to <= 1; NaN when the values change sign or the max is 0 (FAIRNESS §4.3).
double ratio_min_max(const std::vector<double>& v) {
  const auto mm = std::minmax_element(v.begin(), v.end());
  const double lo = *mm.first, hi = *mm.second;
  if (hi == 0.0 || (lo < 0.0 && hi > 0.0)) return kNaN;
  const double r = lo / hi;
  return r > 1.0 ? 1.0 / r : r;
}

// Summaries of one (metric, family) from slice values x (variant) and r (reference). A slice
// that is NaN (absent from a resample, or an undefined metric) makes that estimand's summaries
// NaN rather than summarising a subset of the family, which would bias gaps downwards.
FamilySummary summarize(const std::vector<double>& x, const std::vector<double>& r,
                        double x_all, double r_all, bool has_ref, bool higher_is_better) {
  FamilySummary f;
  std::fill(std::begin(f.level), std::end(f.level), kNaN);
  std::fill(std::begin(f.delta), std::end(f.delta), kNaN);
  if (!any_nan(x)) {
    f.level_worst = worst_index(x, higher_is_better);
    f.level[kWorst] = x[static_cast<size_t>(f.level_worst)];
    f.level[kGapBetween] = gap_between(x);
    f.level[kGapToOverall] = gap_to_overall(x, x_all);
    f.level[kRatioMinMax] = ratio_min_max(x);
    if (has_ref && !any_nan(r)) f.level[kAmplification] = gap_between(x) - gap_between(r);
  }
  if (has_ref) {
    std::vector<double> d(x.size());
    for (size_t i = 0; i < x.size(); ++i) d[i] = x[i] - r[i];
    if (!any_nan(d)) {
      f.delta_worst = worst_index(d, higher_is_better);
      f.delta[kDWorst] = d[static_cast<size_t>(f.delta_worst)];
      f.delta[kDGapBetween] = gap_between(d);
      f.delta[kDGapToOverall] = gap_to_overall(d, x_all - r_all);
    }
  }
  return f;
}

// The block layout: every metric call must stay inside `columns`, the token column must be
// inside a block, and every slice family key must name one family only.
void validate_blocks(const UnitTable& t) {
  const Index n_cols = static_cast<Index>(t.columns.size());
  const Index bs = t.block_size;
  auto bad = [](const std::string& what) { throw ShapeError("unit table: " + what); };
  if (bs < 0 || bs > n_cols) {
    bad("block_size " + std::to_string(bs) + " is outside [0, " + std::to_string(n_cols) +
        "] (the number of columns)");
  }
  const Index tok = t.token_column.empty() ? -1 : t.column(t.token_column);
  if (bs > 0 && tok >= bs) {
    bad("token column '" + t.token_column + "' is column " + std::to_string(tok) +
        ", outside the first block of " + std::to_string(bs) + " columns");
  }
  if (t.token_families.empty()) return;
  if (bs == 0) bad("token families need block_size > 0");
  if (tok < 0) bad("token families need a token_column (n_units counts units with tokens)");
  std::vector<std::string> keys = t.attr_keys;
  keys.push_back("__all__");
  for (const auto& f : t.token_families) {
    if (std::find(keys.begin(), keys.end(), f.key) != keys.end()) {
      bad("token family key '" + f.key + "' is already used by another slice family");
    }
    keys.push_back(f.key);
    if (f.offsets.size() != f.values.size()) {
      bad("token family '" + f.key + "' has " + std::to_string(f.offsets.size()) +
          " offsets for " + std::to_string(f.values.size()) + " values");
    }
    for (size_t v = 0; v < f.values.size(); ++v) {
      if (std::find(f.values.begin(), f.values.begin() + static_cast<std::ptrdiff_t>(v),
                    f.values[v]) != f.values.begin() + static_cast<std::ptrdiff_t>(v)) {
        bad("token family '" + f.key + "' lists value '" + f.values[v] + "' twice");
      }
      const Index off = f.offsets[v];
      if (off < 0 || off + bs > n_cols) {
        bad("token family '" + f.key + "' value '" + f.values[v] + "': block at column " +
            std::to_string(off) + " of size " + std::to_string(bs) + " exceeds the " +
            std::to_string(n_cols) + " columns");
      }
    }
  }
}

void validate(const UnitTable& t, const std::vector<SliceMetricDef>& metrics,
              const BootstrapOptions& o) {
  const Index n = t.n_units();
  if (t.attrs.size() != t.attr_keys.size()) {
    throw ShapeError("unit table: " + std::to_string(t.attrs.size()) + " attribute columns for " +
                     std::to_string(t.attr_keys.size()) + " attribute keys");
  }
  for (size_t k = 0; k < t.attrs.size(); ++k) {
    if (static_cast<Index>(t.attrs[k].size()) != n) {
      throw ShapeError("unit table: attribute '" + t.attr_keys[k] + "' has " +
                       std::to_string(t.attrs[k].size()) + " values for " + std::to_string(n) +
                       " units");
    }
  }
  if (t.sums.rows() != n || t.sums.cols() != static_cast<Index>(t.columns.size())) {
    throw ShapeError("unit table: sums is " + std::to_string(t.sums.rows()) + "x" +
                     std::to_string(t.sums.cols()) + ", expected " + std::to_string(n) + "x" +
                     std::to_string(t.columns.size()) + " (units x columns)");
  }
  validate_blocks(t);
  for (const auto& m : metrics) {
    if (!m.value) throw Error("slice metric '" + m.name + "' has no value function");
  }
  if (o.n_boot < 0) {
    throw ConfigError(SourceLoc{}, "n_boot",
                      "expected an integer >= 0, found " + std::to_string(o.n_boot));
  }
  if (!(o.ci_level > 0.0 && o.ci_level < 1.0)) {
    throw ConfigError(SourceLoc{}, "ci_level",
                      "expected a value in (0, 1), found " + std::to_string(o.ci_level));
  }
}

}  // namespace

double quantile_linear(std::vector<double> v, double q) {
  v.erase(std::remove_if(v.begin(), v.end(), [](double x) { return std::isnan(x); }), v.end());
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  if (lo + 1 >= v.size()) return v.back();
  const double frac = pos - static_cast<double>(lo);
  return v[lo] + frac * (v[lo + 1] - v[lo]);
}

Index UnitTable::column(const std::string& name) const {
  for (size_t i = 0; i < columns.size(); ++i) {
    if (columns[i] == name) return static_cast<Index>(i);
  }
  std::string known;
  for (const auto& c : columns) known += (known.empty() ? "" : ", ") + c;
  throw Error("unit table has no column '" + name + "' (columns: " + known + ")");
}

std::string flags_to_string(uint32_t flags) {
  static const std::pair<uint32_t, const char*> kNames[] = {{kFlagFewUnits, "few_units"},
                                                            {kFlagFewTokens, "few_tokens"},
                                                            {kFlagImprecise, "imprecise"},
                                                            {kFlagEmpty, "empty"}};
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if (flags & bit) out += (out.empty() ? "" : "|") + std::string(name);
  }
  return out;
}

SliceReport evaluate_slices(const UnitTable& units, const std::vector<SliceMetricDef>& metrics,
                            const BootstrapOptions& opts) {
  validate(units, metrics, opts);
  const Layout L = make_layout(units);
  const Index tok_col = L.tok_col;
  const size_t M = metrics.size(), S = static_cast<size_t>(L.n_slices);
  const int B = opts.n_boot;

  // ---- point estimates: every unit once ----
  Totals point(L);
  point.clear_groups();
  for (Index u = 0; u < L.n_units; ++u) point.add_unit(L, units.sums, u);
  point.groups_to_slices(L);
  std::vector<double> pval(M * S), pref(M * S);
  eval_metrics(L, point, metrics, pval.data(), pref.data());

  // ---- replicates: strata are the design cells, or one stratum of all units ----
  std::vector<std::vector<Index>> strata;
  if (opts.stratify) {
    strata = L.group_units;
  } else if (L.n_units > 0) {
    strata.emplace_back(static_cast<size_t>(L.n_units));
    for (Index u = 0; u < L.n_units; ++u) strata[0][static_cast<size_t>(u)] = u;
  }
  // Each replicate writes only its own slot, so the schedule cannot change the results.
  std::vector<double> rval(static_cast<size_t>(B) * M * S), rref(static_cast<size_t>(B) * M * S);
  ParallelErrors errs;
#pragma omp parallel
  {
    Totals T(L);
#pragma omp for schedule(dynamic, 4)
    for (int b = 0; b < B; ++b) {
      errs.run(b, [&] {
        T.clear_groups();
        for (size_t c = 0; c < strata.size(); ++c) {
          const auto& su = strata[c];
          const uint64_t n_c = su.size();
          const CounterRng rng(opts.seed, mix_stream(static_cast<uint64_t>(b), c));
          for (uint64_t j = 0; j < n_c; ++j) T.add_unit(L, units.sums, su[rng.below(j, n_c)]);
        }
        T.groups_to_slices(L);
        const size_t off = static_cast<size_t>(b) * M * S;
        eval_metrics(L, T, metrics, rval.data() + off, rref.data() + off);
      });
    }
  }
  errs.rethrow();

  const double q_lo = (1.0 - opts.ci_level) / 2.0, q_hi = 1.0 - q_lo;
  auto ci = [&](const std::vector<double>& reps, double* lo, double* hi) {
    if (B == 0) {
      *lo = *hi = kNaN;
      return;
    }
    *lo = quantile_linear(reps, q_lo);
    *hi = quantile_linear(reps, q_hi);
  };

  SliceReport report;

  // ---- per-slice rows ----
  std::vector<std::string> slice_key(S, "__all__"), slice_value(S, "__all__");
  for (const Family& f : L.families) {
    for (size_t v = 0; v < f.values.size(); ++v) {
      slice_key[static_cast<size_t>(f.slice_offset) + v] = f.key;
      slice_value[static_cast<size_t>(f.slice_offset) + v] = f.values[v];
    }
  }
  std::vector<double> reps(static_cast<size_t>(B)), dreps(static_cast<size_t>(B));
  for (size_t m = 0; m < M; ++m) {
    const bool has_ref = static_cast<bool>(metrics[m].reference);
    for (size_t s = 0; s < S; ++s) {
      SliceRow row;
      row.metric = metrics[m].name;
      row.slice_key = slice_key[s];
      row.slice_value = slice_value[s];
      row.n_units = point.slice_n[s];
      row.n_tokens = tok_col < 0 ? 0 : std::llround(point.at(L, s)[tok_col]);
      row.value = pval[m * S + s];
      row.ref_value = pref[m * S + s];
      row.delta = has_ref ? row.value - row.ref_value : kNaN;
      for (int b = 0; b < B; ++b) {
        const size_t i = (static_cast<size_t>(b) * M + m) * S + s;
        reps[static_cast<size_t>(b)] = rval[i];
        dreps[static_cast<size_t>(b)] = rval[i] - rref[i];
      }
      ci(reps, &row.ci_low, &row.ci_high);
      if (has_ref) {
        ci(dreps, &row.delta_ci_low, &row.delta_ci_high);
      } else {
        row.delta_ci_low = row.delta_ci_high = kNaN;
      }
      if (row.n_units == 0) row.flags |= kFlagEmpty;
      if (row.n_units < opts.min_units) row.flags |= kFlagFewUnits;
      if (tok_col >= 0 && row.n_tokens < opts.min_tokens) row.flags |= kFlagFewTokens;
      if (has_ref && std::isfinite(row.delta) && row.delta != 0.0 &&
          std::isfinite(row.delta_ci_low) && std::isfinite(row.delta_ci_high) &&
          0.5 * (row.delta_ci_high - row.delta_ci_low) > 0.5 * std::fabs(row.delta)) {
        row.flags |= kFlagImprecise;
      }
      report.rows.push_back(std::move(row));
    }
  }

  // ---- disparity per (metric, family with >= 2 values) ----
  for (size_t m = 0; m < M; ++m) {
    const bool has_ref = static_cast<bool>(metrics[m].reference);
    const bool hib = metrics[m].higher_is_better;
    for (const Family& fam : L.families) {
      // The family's slices with a value in the point estimate: a slice no unit falls into
      // (flagged empty in its row) has no value to compare, so it does not turn every summary
      // of its family into NaN; the replicates summarise the same slices.
      const size_t s0 = static_cast<size_t>(fam.slice_offset);
      std::vector<size_t> keep;
      for (size_t v = 0; v < fam.values.size(); ++v)
        if (std::isfinite(pval[m * S + s0 + v])) keep.push_back(v);
      if (keep.size() < 2) continue;
      auto family = [&](const double* val, const double* ref) {
        std::vector<double> x, r;
        for (size_t v : keep) x.push_back(val[s0 + v]), r.push_back(ref[s0 + v]);
        return summarize(x, r, val[0], ref[0], has_ref, hib);
      };
      const FamilySummary obs = family(pval.data() + m * S, pref.data() + m * S);
      std::vector<FamilySummary> rep(static_cast<size_t>(B));
      for (int b = 0; b < B; ++b) {
        const size_t off = (static_cast<size_t>(b) * M + m) * S;
        rep[static_cast<size_t>(b)] = family(rval.data() + off, rref.data() + off);
      }
      // Share of replicates (with a defined worst slice) whose worst is the observed one.
      auto p_worst = [&](int observed, bool on_delta) {
        if (B == 0 || observed < 0) return kNaN;
        int64_t defined = 0, same = 0;
        for (const auto& f : rep) {
          const int w = on_delta ? f.delta_worst : f.level_worst;
          if (w < 0) continue;
          ++defined;
          if (w == observed) ++same;
        }
        return defined == 0 ? kNaN : static_cast<double>(same) / static_cast<double>(defined);
      };
      auto emit = [&](const char* on, const char* const* names, int n_summ, int observed,
                      const double* obs_vals, bool on_delta) {
        const double pw = p_worst(observed, on_delta);
        const std::string worst =
            observed < 0 ? std::string() : fam.values[keep[static_cast<size_t>(observed)]];
        for (int i = 0; i < n_summ; ++i) {
          if (!on_delta && i == kAmplification && !has_ref) continue;
          DisparityRow d;
          d.metric = metrics[m].name;
          d.slice_key = fam.key;
          d.summary = names[i];
          d.on = on;
          d.worst_slice = worst;
          d.p_worst = pw;
          d.value = obs_vals[i];
          std::vector<double> sv(static_cast<size_t>(B));
          for (int b = 0; b < B; ++b) {
            const auto& f = rep[static_cast<size_t>(b)];
            sv[static_cast<size_t>(b)] = on_delta ? f.delta[i] : f.level[i];
          }
          ci(sv, &d.ci_low, &d.ci_high);
          report.disparity.push_back(std::move(d));
        }
      };
      emit("level", kLevelNames, kNLevel, obs.level_worst, obs.level, false);
      if (has_ref) emit("delta", kDeltaNames, kNDelta, obs.delta_worst, obs.delta, true);
    }
  }
  return report;
}

}  // namespace ql
