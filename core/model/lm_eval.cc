#include "core/model/lm_eval.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "core/detmath.h"
#include "core/error.h"

namespace ql {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

const char* const kColumnNames[kLmBlockSize] = {
    "n_tokens", "sum_nll_q",  "sum_nll_fp", "sum_kl",  "n_agree", "n_correct_q",
    "n_correct_fp", "n_c2w",  "n_w2c",      "sum_dp",  "sum_dp2"};

// log Σ_i e^{x_i} computed as m + log Σ_i e^{x_i - m} with m = max x (no overflow; the largest
// term is exactly 1), and the first index of the maximum. The terms e^{x_i - m} are left in `e`
// (float, core/detmath's exp: the same bits on every CPU); their sum is taken in double.
struct RowSummary {
  double lse;
  double sum;  // Σ_i e^{x_i - m}
  int32_t argmax;
};

/// Σ x[i] in double, in four interleaved partial sums (a fixed order whatever the alignment).
double sum_as_double(const float* x, Index n) {
  double a[4] = {0.0, 0.0, 0.0, 0.0};
  Index i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) a[l] += static_cast<double>(x[i + l]);
  for (; i < n; ++i) a[0] += static_cast<double>(x[i]);
  return (a[0] + a[1]) + (a[2] + a[3]);
}

RowSummary summarize_row(const float* x, Index vocab, const char* which, float* e) {
  int32_t am = 0;
  for (Index i = 0; i < vocab; ++i) {
    if (!std::isfinite(x[i])) {
      throw NumericError(std::string(which) + " logit of token id " + std::to_string(i) +
                         " is " + std::to_string(x[i]));
    }
    if (x[i] > x[am]) am = static_cast<int32_t>(i);  // strict: ties keep the lowest id
  }
  const float m = x[am];
  for (Index i = 0; i < vocab; ++i) e[i] = x[i] - m;
  detmath::exp_inplace(e, vocab);
  const double s = sum_as_double(e, vocab);
  return {static_cast<double>(m) + detmath::log(s), s, am};
}

void check_names(const std::vector<std::string>& names, const char* family) {
  if (names.empty()) {
    throw ConfigError(SourceLoc{}, family, "expected at least one bucket name, found none");
  }
  for (size_t i = 0; i < names.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (names[i] == names[j]) {
        throw ConfigError(SourceLoc{}, family, "bucket name '" + names[i] + "' appears twice");
      }
    }
  }
}

// Sorted distinct values of each design family and each unit's value index, as
// evaluate_slices orders them.
struct DesignIndex {
  std::vector<std::vector<std::string>> values;  // [family] sorted
  std::vector<std::vector<int>> value_of_unit;   // [family][unit]
};

DesignIndex index_design(const UnitTable& t) {
  DesignIndex d;
  for (const auto& col : t.attrs) {
    std::vector<std::string> v = col;
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    std::vector<int> idx(col.size());
    for (size_t u = 0; u < col.size(); ++u)
      idx[u] = static_cast<int>(std::lower_bound(v.begin(), v.end(), col[u]) - v.begin());
    d.values.push_back(std::move(v));
    d.value_of_unit.push_back(std::move(idx));
  }
  return d;
}

void check_attrs(const std::vector<std::string>& attr_keys,
                 const std::vector<std::vector<std::string>>& attrs, size_t n_units,
                 const char* what) {
  if (attrs.size() != attr_keys.size()) {
    throw ShapeError(std::string(what) + ": " + std::to_string(attrs.size()) +
                     " attribute columns for " + std::to_string(attr_keys.size()) +
                     " attribute keys");
  }
  for (size_t k = 0; k < attrs.size(); ++k) {
    if (attrs[k].size() != n_units) {
      throw ShapeError(std::string(what) + ": attribute '" + attr_keys[k] + "' has " +
                       std::to_string(attrs[k].size()) + " values for " +
                       std::to_string(n_units) + " units");
    }
  }
}

}  // namespace

const char* lm_column_name(int column) {
  if (column < 0 || column >= kLmBlockSize) {
    throw Error("LM statistics column " + std::to_string(column) + " is outside [0, " +
                std::to_string(static_cast<int>(kLmBlockSize)) + ")");
  }
  return kColumnNames[column];
}

LmTokenStats lm_score_token(const float* fp_row, const float* q_row, Index vocab,
                            int32_t target) {
  thread_local std::vector<float> ef, eq;  // e^{x_i - m} of each row
  ef.resize(static_cast<size_t>(vocab));
  const RowSummary f = summarize_row(fp_row, vocab, "FP", ef.data());
  // Bitwise equal rows (the FP model against itself, or eval.kl: false) give equal
  // quantities and a KL of exactly 0 without a second pass.
  const bool same =
      fp_row == q_row || std::memcmp(fp_row, q_row, static_cast<size_t>(vocab) * sizeof(float)) == 0;
  RowSummary q = f;
  double kl = 0.0;
  if (!same) {
    eq.resize(static_cast<size_t>(vocab));
    q = summarize_row(q_row, vocab, "quantized", eq.data());
    // KL = Σ_i p_i (ℓfp_i - ℓq_i), p_i = e^{x_i - m}/Σ, ℓfp_i - ℓq_i = (x_i - xq_i) - (lse_f - lse_q).
    const double c = f.lse - q.lse;
    double a[4] = {0.0, 0.0, 0.0, 0.0};
    Index i = 0;
    auto term = [&](Index j) {
      return static_cast<double>(ef[j]) *
             ((static_cast<double>(fp_row[j]) - static_cast<double>(q_row[j])) - c);
    };
    for (; i + 4 <= vocab; i += 4)
      for (int l = 0; l < 4; ++l) a[l] += term(i + l);
    for (; i < vocab; ++i) a[0] += term(i);
    kl = ((a[0] + a[1]) + (a[2] + a[3])) / f.sum;
  }
  LmTokenStats s;
  s.kl = std::max(kl, 0.0);  // KL >= 0 (Gibbs); a negative sum is rounding of a ~0 divergence
  s.nll_fp = f.lse - static_cast<double>(fp_row[target]);
  s.nll_q = q.lse - static_cast<double>(q_row[target]);
  s.p_fp = detmath::exp(-s.nll_fp);
  s.p_q = detmath::exp(-s.nll_q);
  s.top1_fp = f.argmax;
  s.top1_q = q.argmax;
  s.correct_fp = f.argmax == target;
  s.correct_q = q.argmax == target;
  s.agree = f.argmax == q.argmax;
  return s;
}

LmEvalAccumulator::LmEvalAccumulator(int n_units, std::vector<std::string> freq_bucket_names,
                                     std::function<int(int32_t)> freq_bucket,
                                     std::vector<std::string> pos_bucket_names,
                                     std::function<int(int64_t)> pos_bucket)
    : n_units_(n_units),
      freq_names_(std::move(freq_bucket_names)),
      pos_names_(std::move(pos_bucket_names)),
      freq_bucket_(std::move(freq_bucket)),
      pos_bucket_(std::move(pos_bucket)),
      mu_(std::make_unique<std::mutex>()) {
  if (n_units < 0) {
    throw ConfigError(SourceLoc{}, "n_units",
                      "expected an integer >= 0, found " + std::to_string(n_units));
  }
  check_names(freq_names_, kTokenFreqFamily);
  check_names(pos_names_, kPositionFamily);
  if (!freq_bucket_) {
    throw ConfigError(SourceLoc{}, kTokenFreqFamily, "no frequency bucket function given");
  }
  if (!pos_bucket_) {
    throw ConfigError(SourceLoc{}, kPositionFamily, "no position bucket function given");
  }
}

LmEvalAccumulator::Window LmEvalAccumulator::score_window(const std::string& where, int unit,
                                                          const std::vector<int32_t>& ids,
                                                          const Matrix& logits_fp,
                                                          const Matrix& logits_q,
                                                          int64_t first_scored) const {
  const int64_t T = static_cast<int64_t>(ids.size());
  if (unit < 0 || unit >= n_units_) {
    throw ShapeError(where + ": unit " + std::to_string(unit) + " is outside [0, " +
                     std::to_string(n_units_) + ")");
  }
  if (T < 1) throw ShapeError(where + ": no token ids");
  if (logits_fp.rows() != T || logits_q.rows() != T || logits_q.cols() != logits_fp.cols() ||
      logits_fp.cols() < 1) {
    throw ShapeError(where + ": logits are " + std::to_string(logits_fp.rows()) + "x" +
                     std::to_string(logits_fp.cols()) + " (FP) and " +
                     std::to_string(logits_q.rows()) + "x" + std::to_string(logits_q.cols()) +
                     " (quantized); expected both " + std::to_string(T) +
                     " x vocab (one row per token id)");
  }
  if (first_scored < 1 || first_scored > T) {
    throw ShapeError(where + ": first scored position " + std::to_string(first_scored) +
                     " is outside [1, " + std::to_string(T) + "]");
  }
  const Index V = logits_fp.cols();
  for (int64_t t = 0; t < T; ++t) {
    if (ids[static_cast<size_t>(t)] < 0 || ids[static_cast<size_t>(t)] >= V) {
      throw ShapeError(where + ": token id " + std::to_string(ids[static_cast<size_t>(t)]) +
                       " at position " + std::to_string(t) + " is outside the vocabulary of " +
                       std::to_string(V));
    }
  }

  const int F = static_cast<int>(freq_names_.size()), P = static_cast<int>(pos_names_.size());
  Window w;
  w.unit = unit;
  w.sums.assign(static_cast<size_t>(n_blocks()) * kLmBlockSize, 0.0);
  const size_t n_scored = static_cast<size_t>(T - first_scored);
  w.kl.reserve(n_scored);
  w.freq.reserve(n_scored);
  w.pos.reserve(n_scored);
  for (int64_t t = first_scored; t < T; ++t) {
    const int32_t y = ids[static_cast<size_t>(t)];
    const int fb = freq_bucket_(y);
    if (fb < 0 || fb >= F) {
      throw ShapeError(where + ": frequency bucket of token id " + std::to_string(y) + " is " +
                       std::to_string(fb) + ", outside [0, " + std::to_string(F) + ")");
    }
    const int pb = pos_bucket_(t);
    if (pb < 0 || pb >= P) {
      throw ShapeError(where + ": position bucket of position " + std::to_string(t) + " is " +
                       std::to_string(pb) + ", outside [0, " + std::to_string(P) + ")");
    }
    LmTokenStats s;
    try {
      s = lm_score_token(logits_fp.data() + (t - 1) * V, logits_q.data() + (t - 1) * V, V, y);
    } catch (const NumericError& e) {
      throw NumericError(where + ", logits row " + std::to_string(t - 1) + ": " + e.what());
    }
    const double dp = s.p_q - s.p_fp;
    double v[kLmBlockSize];
    v[kLmTokens] = 1.0;
    v[kLmNllQ] = s.nll_q;
    v[kLmNllFp] = s.nll_fp;
    v[kLmKl] = s.kl;
    v[kLmAgree] = s.agree ? 1.0 : 0.0;
    v[kLmCorrectQ] = s.correct_q ? 1.0 : 0.0;
    v[kLmCorrectFp] = s.correct_fp ? 1.0 : 0.0;
    v[kLmC2w] = s.correct_fp && !s.correct_q ? 1.0 : 0.0;
    v[kLmW2c] = !s.correct_fp && s.correct_q ? 1.0 : 0.0;
    v[kLmDp] = dp;
    v[kLmDp2] = dp * dp;
    for (int block : {0, 1 + fb, 1 + F + pb}) {
      double* dst = w.sums.data() + static_cast<size_t>(block) * kLmBlockSize;
      for (int c = 0; c < kLmBlockSize; ++c) dst[c] += v[c];
    }
    w.kl.push_back(static_cast<float>(s.kl));
    w.freq.push_back(fb);
    w.pos.push_back(pb);
  }
  return w;
}

void LmEvalAccumulator::add_window(int64_t window, int unit, const std::vector<int32_t>& ids,
                                   const Matrix& logits_fp, const Matrix& logits_q,
                                   int64_t first_scored) {
  const std::string where = "LM evaluation window " + std::to_string(window);
  Window w = score_window(where, unit, ids, logits_fp, logits_q, first_scored);
  std::lock_guard<std::mutex> lock(*mu_);
  if (!windows_.emplace(window, std::move(w)).second) throw Error(where + " was already added");
}

void LmEvalAccumulator::add_window(int unit, const std::vector<int32_t>& ids,
                                   const Matrix& logits_fp, const Matrix& logits_q,
                                   int64_t first_scored) {
  const int64_t window = windows_.empty() ? 0 : windows_.rbegin()->first + 1;
  Window w = score_window("LM evaluation window " + std::to_string(window), unit, ids,
                          logits_fp, logits_q, first_scored);
  std::lock_guard<std::mutex> lock(*mu_);
  windows_.emplace(window, std::move(w));
}

void LmEvalAccumulator::merge(const LmEvalAccumulator& other) {
  if (&other == this) throw Error("cannot merge an LM evaluation accumulator into itself");
  if (other.n_units_ != n_units_ || other.freq_names_ != freq_names_ ||
      other.pos_names_ != pos_names_) {
    throw Error("cannot merge LM evaluation accumulators with different units or buckets (" +
                std::to_string(n_units_) + " vs " + std::to_string(other.n_units_) + " units)");
  }
  for (const auto& [index, w] : other.windows_) {
    if (windows_.count(index)) {
      throw Error("cannot merge LM evaluation accumulators: both hold window " +
                  std::to_string(index));
    }
  }
  for (const auto& [index, w] : other.windows_) windows_.emplace(index, w);
}

int64_t LmEvalAccumulator::scored_tokens() const {
  int64_t n = 0;
  for (const auto& [index, w] : windows_) n += static_cast<int64_t>(w.kl.size());
  return n;
}

UnitTable LmEvalAccumulator::unit_table(std::vector<std::string> unit_ids,
                                        std::vector<std::string> attr_keys,
                                        std::vector<std::vector<std::string>> attrs) const {
  const size_t N = static_cast<size_t>(n_units_);
  if (unit_ids.size() != N) {
    throw ShapeError("LM unit table: " + std::to_string(unit_ids.size()) + " unit ids for " +
                     std::to_string(N) + " units");
  }
  check_attrs(attr_keys, attrs, N, "LM unit table");

  UnitTable t;
  t.unit_ids = std::move(unit_ids);
  t.attr_keys = std::move(attr_keys);
  t.attrs = std::move(attrs);
  const int F = static_cast<int>(freq_names_.size());
  for (int c = 0; c < kLmBlockSize; ++c) t.columns.push_back(kColumnNames[c]);
  for (const auto& [family, names] :
       {std::make_pair(kTokenFreqFamily, &freq_names_), std::make_pair(kPositionFamily, &pos_names_)}) {
    for (const auto& name : *names)
      for (int c = 0; c < kLmBlockSize; ++c)
        t.columns.push_back(std::string(family) + "=" + name + "/" + kColumnNames[c]);
  }
  t.token_column = kColumnNames[kLmTokens];
  t.block_size = kLmBlockSize;
  TokenFamily freq{kTokenFreqFamily, freq_names_, {}};
  for (int v = 0; v < F; ++v) freq.offsets.push_back(static_cast<Index>(1 + v) * kLmBlockSize);
  TokenFamily pos{kPositionFamily, pos_names_, {}};
  for (size_t v = 0; v < pos_names_.size(); ++v)
    pos.offsets.push_back(static_cast<Index>(1 + F + static_cast<int>(v)) * kLmBlockSize);
  t.token_families = {std::move(freq), std::move(pos)};

  // Ascending window index: the fixed reduction order that makes the sums reproducible.
  const Index C = static_cast<Index>(n_blocks()) * kLmBlockSize;
  t.sums = MatrixD::Zero(static_cast<Index>(N), C);
  for (const auto& [index, w] : windows_) {
    double* row = t.sums.data() + static_cast<Index>(w.unit) * C;
    for (Index c = 0; c < C; ++c) row[c] += w.sums[static_cast<size_t>(c)];
  }
  return t;
}

std::vector<KlSliceQuantiles> LmEvalAccumulator::kl_quantiles(const UnitTable& units) const {
  if (units.n_units() != n_units_) {
    throw ShapeError("KL quantiles: the unit table has " + std::to_string(units.n_units()) +
                     " units, the accumulator " + std::to_string(n_units_));
  }
  check_attrs(units.attr_keys, units.attrs, static_cast<size_t>(n_units_), "KL quantiles");
  const DesignIndex d = index_design(units);

  // Slice layout as in evaluate_slices: overall, design values, freq buckets, pos buckets.
  std::vector<KlSliceQuantiles> rows;
  rows.push_back({"__all__", "__all__", 0, 0, 0});
  std::vector<size_t> design_offset;
  for (size_t k = 0; k < d.values.size(); ++k) {
    design_offset.push_back(rows.size());
    for (const auto& v : d.values[k]) rows.push_back({units.attr_keys[k], v, 0, 0, 0});
  }
  const size_t freq_offset = rows.size();
  for (const auto& v : freq_names_) rows.push_back({kTokenFreqFamily, v, 0, 0, 0});
  const size_t pos_offset = rows.size();
  for (const auto& v : pos_names_) rows.push_back({kPositionFamily, v, 0, 0, 0});

  std::vector<std::vector<double>> kl(rows.size());
  for (const auto& [index, w] : windows_) {
    const size_t u = static_cast<size_t>(w.unit);
    for (size_t i = 0; i < w.kl.size(); ++i) {
      const double x = w.kl[i];
      kl[0].push_back(x);
      for (size_t k = 0; k < d.values.size(); ++k)
        kl[design_offset[k] + static_cast<size_t>(d.value_of_unit[k][u])].push_back(x);
      kl[freq_offset + static_cast<size_t>(w.freq[i])].push_back(x);
      kl[pos_offset + static_cast<size_t>(w.pos[i])].push_back(x);
    }
  }
  for (size_t s = 0; s < rows.size(); ++s) {
    std::sort(kl[s].begin(), kl[s].end());  // once, so the two quantile calls sort sorted data
    rows[s].n_tokens = static_cast<int64_t>(kl[s].size());
    rows[s].median = quantile_linear(kl[s], 0.5);
    rows[s].p99 = quantile_linear(kl[s], 0.99);
  }
  return rows;
}

double LmEvalAccumulator::kl_quantile(
    const std::function<bool(int unit, int freq_bucket, int pos_bucket)>& keep, double q) const {
  std::vector<double> kept;
  for (const auto& [index, w] : windows_) {
    for (size_t i = 0; i < w.kl.size(); ++i)
      if (keep(w.unit, w.freq[i], w.pos[i])) kept.push_back(w.kl[i]);
  }
  return quantile_linear(std::move(kept), q);
}

std::vector<std::pair<std::string, double>> LmEvalAccumulator::kl_quantiles_overall() const {
  std::vector<double> all;
  for (const auto& [index, w] : windows_) all.insert(all.end(), w.kl.begin(), w.kl.end());
  std::sort(all.begin(), all.end());
  return {{"kl_median", quantile_linear(all, 0.5)}, {"kl_p99", quantile_linear(all, 0.99)}};
}

std::vector<SliceMetricDef> lm_metric_defs() {
  using Fn = std::function<double(const double*)>;
  // Ratio of a column to the token count; NaN for a block without tokens.
  auto per_token = [](int col) -> Fn {
    return [col](const double* t) { return t[kLmTokens] > 0 ? t[col] / t[kLmTokens] : kNaN; };
  };
  auto constant = [](double c) -> Fn {
    return [c](const double* t) { return t[kLmTokens] > 0 ? c : kNaN; };
  };
  auto def = [](std::string name, bool higher_is_better, Fn value, Fn reference) {
    SliceMetricDef m;
    m.name = std::move(name);
    m.higher_is_better = higher_is_better;
    m.value = std::move(value);
    m.reference = std::move(reference);
    return m;
  };
  const Fn nll_q = per_token(kLmNllQ), nll_fp = per_token(kLmNllFp);
  const Fn agree = per_token(kLmAgree);
  return {
      def("ppl", false, [nll_q](const double* t) { return detmath::exp(nll_q(t)); },
          [nll_fp](const double* t) { return detmath::exp(nll_fp(t)); }),
      def("nll", false, nll_q, nll_fp),
      def("kl_mean", false, per_token(kLmKl), constant(0.0)),
      def("top1_agree", true, agree, constant(1.0)),
      def("flip_rate", false, [agree](const double* t) { return 1.0 - agree(t); }, constant(0.0)),
      def("acc", true, per_token(kLmCorrectQ), per_token(kLmCorrectFp)),
      def("c2w_rate", false, per_token(kLmC2w), constant(0.0)),
      def("w2c_rate", true, per_token(kLmW2c), constant(0.0)),
      def("mean_dp", true, per_token(kLmDp), constant(0.0)),
      def("rms_dp", false,
          [](const double* t) {
            return t[kLmTokens] > 0 ? std::sqrt(t[kLmDp2] / t[kLmTokens]) : kNaN;
          },
          constant(0.0)),
  };
}

}  // namespace ql
