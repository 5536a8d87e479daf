#include "core/model/lm_eval.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>

#include "core/error.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace ql {
namespace {

// ---- fixtures ----

const std::vector<std::string> kFreqNames = {"frequent", "mid", "rare"};
const std::vector<std::string> kPosNames = {"1-3", "4-15", "16+"};

// Buckets for a vocabulary of `vocab`: thirds of the id range; positions 1-3, 4-15, 16+.
std::function<int(int32_t)> freq_bucket_of(int vocab) {
  return [vocab](int32_t y) { return y < vocab / 3 ? 0 : (y < 2 * vocab / 3 ? 1 : 2); };
}
int pos_bucket_fn(int64_t t) { return t < 4 ? 0 : (t < 16 ? 1 : 2); }

LmEvalAccumulator make_acc(int n_units, int vocab) {
  return LmEvalAccumulator(n_units, kFreqNames, freq_bucket_of(vocab), kPosNames, pos_bucket_fn);
}

// Logits on a 1/64 grid in [-4, 4): exactly representable, so adding 8 or 16 stays exact.
Matrix grid_logits(Index T, Index V, uint64_t stream) {
  const CounterRng rng(2024, stream);
  Matrix m(T, V);
  for (Index i = 0; i < T * V; ++i)
    m.data()[i] = static_cast<float>(std::floor(512.0 * rng.uniform(static_cast<uint64_t>(i))) /
                                     64.0 - 4.0);
  return m;
}

// The quantized model's logits: the FP logits plus noise.
Matrix perturb(const Matrix& fp, double scale, uint64_t stream) {
  const CounterRng rng(77, stream);
  Matrix q = fp;
  for (Index i = 0; i < q.size(); ++i)
    q.data()[i] += static_cast<float>(scale * rng.normal(static_cast<uint64_t>(i)));
  return q;
}

std::vector<int32_t> random_ids(Index T, int vocab, uint64_t stream) {
  const CounterRng rng(5, stream);
  std::vector<int32_t> ids(static_cast<size_t>(T));
  for (Index t = 0; t < T; ++t)
    ids[static_cast<size_t>(t)] =
        static_cast<int32_t>(rng.below(static_cast<uint64_t>(t), static_cast<uint64_t>(vocab)));
  return ids;
}

// A small corpus: units with a design attribute, each with 1-3 windows of length 12-27.
struct Corpus {
  int vocab = 24;
  std::vector<std::string> unit_ids, source;
  struct Win { int unit; std::vector<int32_t> ids; Matrix fp, q; };
  std::vector<Win> windows;
};

Corpus make_corpus(int n_units, bool identical_q = false) {
  Corpus c;
  const CounterRng rng(9, 0);
  for (int u = 0; u < n_units; ++u) {
    c.unit_ids.push_back("doc" + std::to_string(u));
    c.source.push_back(u % 3 == 0 ? "wiki" : "austen");
    const int n_win = 1 + static_cast<int>(rng.below(static_cast<uint64_t>(u), 3));
    for (int k = 0; k < n_win; ++k) {
      const uint64_t s = static_cast<uint64_t>(100 * u + k);
      const Index T = 12 + static_cast<Index>(rng.below(1000 + s, 16));
      Corpus::Win w;
      w.unit = u;
      w.ids = random_ids(T, c.vocab, s);
      w.fp = grid_logits(T, c.vocab, s);
      // Units of "wiki" get more damage, so slices differ.
      w.q = identical_q ? w.fp : perturb(w.fp, u % 3 == 0 ? 0.8 : 0.3, s);
      c.windows.push_back(std::move(w));
    }
  }
  return c;
}

LmEvalAccumulator accumulate(const Corpus& c) {
  LmEvalAccumulator acc = make_acc(static_cast<int>(c.unit_ids.size()), c.vocab);
  for (size_t w = 0; w < c.windows.size(); ++w) {
    const auto& win = c.windows[w];
    acc.add_window(static_cast<int64_t>(w), win.unit, win.ids, win.fp, win.q);
  }
  return acc;
}

UnitTable table_of(const LmEvalAccumulator& acc, const Corpus& c) {
  return acc.unit_table(c.unit_ids, {"source"}, {c.source});
}

const SliceRow& find_row(const SliceReport& r, const std::string& metric,
                         const std::string& key, const std::string& value) {
  for (const auto& row : r.rows)
    if (row.metric == metric && row.slice_key == key && row.slice_value == value) return row;
  throw std::runtime_error("row not found: " + metric + " " + key + "=" + value);
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Naive log-softmax (no max shift; the test logits are small), for direct computations.
/// Per-token scores are computed with the softmax terms e^{x_i - m} in float (core/detmath's
/// expf, ~1 ulp) and everything after in double, so they agree with double-precision formulas
/// to ~1e-8: the tolerance of the hand-computed checks.
constexpr double kScoreTol = 1e-7;

double naive_nll(const float* row, int vocab, int32_t y) {
  double s = 0;
  for (int i = 0; i < vocab; ++i) s += std::exp(static_cast<double>(row[i]));
  return std::log(s) - row[y];
}

// ---- per-token quantities ----

TEST(LmEval, HandComputedTwoTokensThreeVocab) {
  // ids {2, 0, 1}: row 0 predicts id 0, row 1 predicts id 1.
  const std::vector<int32_t> ids = {2, 0, 1};
  Matrix fp(3, 3), q(3, 3);
  fp << 1, 2, 0,  //
      0, 3, 1,    //
      0, 0, 0;    // last row predicts nothing
  q << 1, 1, 0.5,  //
      0.5, 2, 2.5,  //
      9, 9, 9;
  // Token 1 (y = 0): FP top-1 is id 1 (wrong); Q ties ids 0 and 1 -> lowest id 0 (right): w2c.
  //   nll_q = log(2e + e^0.5) - 1, nll_fp = log(e + e² + 1) - 1.
  const LmTokenStats a = lm_score_token(fp.row(0).data(), q.row(0).data(), 3, 0);
  const double e = std::exp(1.0);
  EXPECT_NEAR(a.nll_q, std::log(2 * e + std::exp(0.5)) - 1.0, kScoreTol);
  EXPECT_NEAR(a.nll_q, 0.9580200879470335, kScoreTol);
  EXPECT_NEAR(a.nll_fp, std::log(e + e * e + 1.0) - 1.0, kScoreTol);
  EXPECT_NEAR(a.nll_fp, 1.4076059644443806, kScoreTol);
  // KL = Σ p_fp (log p_fp - log p_q)
  {
    const double zf = e + e * e + 1.0, zq = 2 * e + std::exp(0.5);
    const double pf[3] = {e / zf, e * e / zf, 1.0 / zf}, pq[3] = {e / zq, e / zq,
                                                                  std::exp(0.5) / zq};
    double kl = 0;
    for (int i = 0; i < 3; ++i) kl += pf[i] * std::log(pf[i] / pq[i]);
    EXPECT_NEAR(a.kl, kl, kScoreTol);
    EXPECT_NEAR(a.kl, 0.17063979269228452, kScoreTol);
    EXPECT_NEAR(a.p_q - a.p_fp, pq[0] - pf[0], kScoreTol);
    EXPECT_NEAR(a.p_q - a.p_fp, 0.13892326013575315, kScoreTol);
  }
  EXPECT_EQ(a.top1_fp, 1);
  EXPECT_EQ(a.top1_q, 0);
  EXPECT_FALSE(a.correct_fp);
  EXPECT_TRUE(a.correct_q);
  EXPECT_FALSE(a.agree);
  // Token 2 (y = 1): FP top-1 id 1 (right); Q top-1 id 2 (wrong): c2w.
  const LmTokenStats b = lm_score_token(fp.row(1).data(), q.row(1).data(), 3, 1);
  EXPECT_NEAR(b.nll_q, 1.0549569196419908, kScoreTol);
  EXPECT_NEAR(b.nll_fp, 0.16984601955628564, kScoreTol);
  EXPECT_NEAR(b.kl, 0.5366078024231199, kScoreTol);
  EXPECT_NEAR(b.p_q - b.p_fp, -0.49558730659760464, kScoreTol);
  EXPECT_EQ(b.top1_fp, 1);
  EXPECT_EQ(b.top1_q, 2);
  EXPECT_TRUE(b.correct_fp);
  EXPECT_FALSE(b.correct_q);
  EXPECT_FALSE(b.agree);

  // The same window through the accumulator: id 0 is "frequent", id 1 "mid" (vocab 3);
  // positions 1 and 2 are both in "1-3".
  LmEvalAccumulator acc = make_acc(1, 3);
  acc.add_window(0, 0, ids, fp, q);
  EXPECT_EQ(acc.scored_tokens(), 2);
  const UnitTable t = acc.unit_table({"d"}, {}, {});
  ASSERT_EQ(t.sums.cols(), 7 * kLmBlockSize);
  EXPECT_EQ(t.block_size, kLmBlockSize);
  EXPECT_EQ(t.token_column, "n_tokens");
  const double dpa = a.p_q - a.p_fp, dpb = b.p_q - b.p_fp;
  const double all[kLmBlockSize] = {2,    a.nll_q + b.nll_q, a.nll_fp + b.nll_fp, a.kl + b.kl,
                                    0,    1,                 1,                   1,
                                    1,    dpa + dpb,         dpa * dpa + dpb * dpb};
  for (int c = 0; c < kLmBlockSize; ++c) {
    EXPECT_NEAR(t.sums(0, c), all[c], 1e-15) << lm_column_name(c);
    EXPECT_EQ(t.columns[static_cast<size_t>(c)], lm_column_name(c));
  }
  // Frequency block "frequent" holds token 1 only, "mid" token 2 only, "rare" nothing.
  const Index f0 = kLmBlockSize, f1 = 2 * kLmBlockSize, f2 = 3 * kLmBlockSize;
  EXPECT_EQ(t.columns[static_cast<size_t>(f1 + kLmNllQ)], "token_freq=mid/sum_nll_q");
  EXPECT_EQ(t.sums(0, f0 + kLmTokens), 1.0);
  EXPECT_EQ(t.sums(0, f0 + kLmNllQ), a.nll_q);
  EXPECT_EQ(t.sums(0, f0 + kLmW2c), 1.0);
  EXPECT_EQ(t.sums(0, f0 + kLmC2w), 0.0);
  EXPECT_EQ(t.sums(0, f1 + kLmKl), b.kl);
  EXPECT_EQ(t.sums(0, f1 + kLmC2w), 1.0);
  EXPECT_EQ(t.sums(0, f1 + kLmCorrectFp), 1.0);
  EXPECT_EQ(t.sums(0, f2 + kLmTokens), 0.0);
  // Position block "1-3" holds both tokens.
  const Index p0 = 4 * kLmBlockSize;
  EXPECT_EQ(t.columns[static_cast<size_t>(p0)], "position=1-3/n_tokens");
  EXPECT_EQ(t.sums(0, p0 + kLmTokens), 2.0);
  EXPECT_EQ(t.sums(0, p0 + kLmKl), a.kl + b.kl);
  EXPECT_EQ(t.sums(0, p0 + kLmBlockSize + kLmTokens), 0.0);
}

TEST(LmEval, KlIsNonNegativeAndExactlyZeroForIdenticalLogits) {
  const int V = 50;
  const Matrix fp = grid_logits(40, V, 1);
  const Matrix q = perturb(fp, 0.05, 1);
  const Matrix far = perturb(fp, 3.0, 2);
  for (Index r = 0; r < fp.rows(); ++r) {
    const int32_t y = static_cast<int32_t>(r % V);
    const LmTokenStats s = lm_score_token(fp.row(r).data(), q.row(r).data(), V, y);
    EXPECT_GE(s.kl, 0.0);
    EXPECT_GT(s.kl, 0.0);
    EXPECT_GE(lm_score_token(fp.row(r).data(), far.row(r).data(), V, y).kl, s.kl);
    const LmTokenStats id = lm_score_token(fp.row(r).data(), fp.row(r).data(), V, y);
    EXPECT_EQ(id.kl, 0.0);
    EXPECT_EQ(id.p_q, id.p_fp);
    EXPECT_TRUE(same_bits(id.nll_q, id.nll_fp));
    EXPECT_TRUE(id.agree);
    EXPECT_EQ(id.correct_q, id.correct_fp);
  }
}

TEST(LmEval, InvariantToAddingAConstantToALogitRow) {
  const int V = 40;
  const Matrix fp = grid_logits(30, V, 3);
  const Matrix q = grid_logits(30, V, 4);
  // On the 1/64 grid, + 8 and + 16 are exact in float: only the softmax's rounding differs.
  const Matrix fp2 = (fp.array() + 16.0f).matrix(), q2 = (q.array() + 8.0f).matrix();
  for (Index r = 0; r < fp.rows(); ++r) {
    const int32_t y = static_cast<int32_t>((7 * r) % V);
    const LmTokenStats a = lm_score_token(fp.row(r).data(), q.row(r).data(), V, y);
    const LmTokenStats b = lm_score_token(fp2.row(r).data(), q2.row(r).data(), V, y);
    EXPECT_NEAR(a.nll_q, b.nll_q, 1e-12);
    EXPECT_NEAR(a.nll_fp, b.nll_fp, 1e-12);
    EXPECT_NEAR(a.kl, b.kl, 1e-12);
    EXPECT_NEAR(a.p_q, b.p_q, 1e-14);
    EXPECT_NEAR(a.p_fp, b.p_fp, 1e-14);
    EXPECT_EQ(a.top1_q, b.top1_q);
    EXPECT_EQ(a.top1_fp, b.top1_fp);
  }
}

TEST(LmEval, LargeLogitsStayFinite) {
  // exp(1000) overflows without the max shift.
  const float fp[3] = {1000.f, 999.f, -1000.f}, q[3] = {998.f, 1000.f, 0.f};
  const LmTokenStats s = lm_score_token(fp, q, 3, 0);
  // The terms e^{x_i - m} are float (core/detmath's expf, ~1 ulp): nll to ~1e-8.
  EXPECT_NEAR(s.nll_fp, std::log1p(std::exp(-1.0)), 1e-7);
  EXPECT_NEAR(s.nll_q, 2.0 + std::log1p(std::exp(-2.0)), 1e-7);
  EXPECT_TRUE(std::isfinite(s.kl));
  EXPECT_GT(s.kl, 0.0);
}

// ---- slices ----

TEST(LmEval, PplEqualsExpMeanNllOverallAndPerDesignSlice) {
  const Corpus c = make_corpus(12);
  const LmEvalAccumulator acc = accumulate(c);
  const UnitTable t = table_of(acc, c);
  BootstrapOptions o;
  o.n_boot = 100;
  const SliceReport r = evaluate_slices(t, lm_metric_defs(), o);
  // Direct: per source, Σ nll over scored tokens with a naive log-softmax.
  std::map<std::string, std::array<double, 3>> acc_by;  // {n, nll_q, nll_fp}
  for (const auto& w : c.windows) {
    for (size_t tpos = 1; tpos < w.ids.size(); ++tpos) {
      const double nq = naive_nll(w.q.row(static_cast<Index>(tpos) - 1).data(), c.vocab,
                                  w.ids[tpos]);
      const double nf = naive_nll(w.fp.row(static_cast<Index>(tpos) - 1).data(), c.vocab,
                                  w.ids[tpos]);
      for (const std::string& key : {std::string("__all__"), c.source[static_cast<size_t>(w.unit)]}) {
        auto& a = acc_by[key];
        a[0] += 1;
        a[1] += nq;
        a[2] += nf;
      }
    }
  }
  for (const auto& [value, a] : acc_by) {
    const std::string key = value == "__all__" ? "__all__" : "source";
    const SliceRow& ppl = find_row(r, "ppl", key, value);
    EXPECT_NEAR(ppl.value, std::exp(a[1] / a[0]), kScoreTol * ppl.value) << value;
    EXPECT_NEAR(ppl.ref_value, std::exp(a[2] / a[0]), kScoreTol * ppl.ref_value) << value;
    EXPECT_EQ(ppl.n_tokens, static_cast<int64_t>(a[0]));
    const SliceRow& nll = find_row(r, "nll", key, value);
    EXPECT_NEAR(nll.value, a[1] / a[0], kScoreTol);
    EXPECT_NEAR(nll.delta, std::log(ppl.value / ppl.ref_value), 1e-12);
    EXPECT_LE(ppl.ci_low, ppl.value);
    EXPECT_GE(ppl.ci_high, ppl.value);
  }
  EXPECT_EQ(find_row(r, "ppl", "source", "wiki").n_units, 4);
  EXPECT_EQ(find_row(r, "ppl", "source", "austen").n_units, 8);
  // The noisier "wiki" units lose more.
  EXPECT_GT(find_row(r, "kl_mean", "source", "wiki").value,
            find_row(r, "kl_mean", "source", "austen").value);
}

TEST(LmEval, TokenFamiliesSumToTheAllTokensBlockAndGetBootstrapRows) {
  const Corpus c = make_corpus(15);
  const LmEvalAccumulator acc = accumulate(c);
  const UnitTable t = table_of(acc, c);
  ASSERT_EQ(t.token_families.size(), 2u);
  EXPECT_EQ(t.token_families[0].key, "token_freq");
  EXPECT_EQ(t.token_families[1].key, "position");
  EXPECT_EQ(t.token_families[0].values, kFreqNames);
  EXPECT_EQ(t.token_families[1].values, kPosNames);
  // Each family partitions every unit's tokens: its blocks sum to block 0.
  for (const auto& fam : t.token_families) {
    for (Index u = 0; u < t.n_units(); ++u) {
      for (int col = 0; col < kLmBlockSize; ++col) {
        double s = 0;
        for (Index off : fam.offsets) s += t.sums(u, off + col);
        EXPECT_NEAR(s, t.sums(u, col), 1e-12 * (1.0 + std::fabs(t.sums(u, col))))
            << fam.key << " unit " << u << " " << lm_column_name(col);
      }
    }
  }
  BootstrapOptions o;
  o.n_boot = 200;
  const auto defs = lm_metric_defs();
  const SliceReport r = evaluate_slices(t, defs, o);
  // Per metric: overall, source {austen, wiki}, token_freq x3, position x3.
  ASSERT_EQ(r.rows.size(), defs.size() * 9);
  const std::vector<std::string> keys = {"__all__",    "source",     "source",
                                         "token_freq", "token_freq", "token_freq",
                                         "position",   "position",   "position"};
  for (size_t i = 0; i < 9; ++i) EXPECT_EQ(r.rows[i].slice_key, keys[i]);
  for (size_t v = 0; v < 3; ++v) {
    EXPECT_EQ(r.rows[3 + v].slice_value, kFreqNames[v]);
    EXPECT_EQ(r.rows[6 + v].slice_value, kPosNames[v]);
  }
  // n_units / n_tokens from the raw windows.
  auto bucket_counts = [&](const std::string& key, size_t v, int64_t* n_units, int64_t* n_tok) {
    std::vector<int> per_unit(c.unit_ids.size(), 0);
    for (const auto& w : c.windows)
      for (size_t p = 1; p < w.ids.size(); ++p) {
        const int b = key == "token_freq" ? freq_bucket_of(c.vocab)(w.ids[p])
                                          : pos_bucket_fn(static_cast<int64_t>(p));
        if (b == static_cast<int>(v)) ++per_unit[static_cast<size_t>(w.unit)];
      }
    *n_units = std::count_if(per_unit.begin(), per_unit.end(), [](int n) { return n > 0; });
    *n_tok = 0;
    for (int n : per_unit) *n_tok += n;
  };
  for (const std::string key : {"token_freq", "position"}) {
    const auto& names = key == "token_freq" ? kFreqNames : kPosNames;
    for (size_t v = 0; v < 3; ++v) {
      int64_t nu = 0, nt = 0;
      bucket_counts(key, v, &nu, &nt);
      for (const auto& def : defs) {
        const SliceRow& row = find_row(r, def.name, key, names[v]);
        EXPECT_EQ(row.n_units, nu) << key << "=" << names[v];
        EXPECT_EQ(row.n_tokens, nt) << key << "=" << names[v];
        EXPECT_TRUE(std::isfinite(row.delta_ci_low)) << def.name << " " << names[v];
        EXPECT_LE(row.delta_ci_low, row.delta_ci_high);
        EXPECT_LE(row.ci_low, row.value + 1e-12) << def.name << " " << names[v];
        EXPECT_GE(row.ci_high, row.value - 1e-12) << def.name << " " << names[v];
      }
    }
  }
  // Paired CI of the mean KL excludes 0 everywhere (Q really differs), and disparity
  // summaries exist for both token families.
  EXPECT_GT(find_row(r, "kl_mean", "position", "4-15").delta_ci_low, 0.0);
  int n_disp_freq = 0, n_disp_pos = 0;
  for (const auto& d : r.disparity) {
    n_disp_freq += d.slice_key == "token_freq";
    n_disp_pos += d.slice_key == "position";
  }
  EXPECT_EQ(n_disp_freq, n_disp_pos);
  EXPECT_EQ(n_disp_freq, static_cast<int>(defs.size()) * 8);
}

TEST(LmEval, IdenticalModelsGiveExactlyZeroDeltas) {
  const Corpus c = make_corpus(10, /*identical_q=*/true);
  const LmEvalAccumulator acc = accumulate(c);
  const UnitTable t = table_of(acc, c);
  BootstrapOptions o;
  o.n_boot = 50;
  const SliceReport r = evaluate_slices(t, lm_metric_defs(), o);
  for (const auto& row : r.rows) {
    if (row.n_tokens == 0) continue;
    const std::string where = row.metric + " " + row.slice_key + "=" + row.slice_value;
    EXPECT_EQ(row.delta, 0.0) << where;
    EXPECT_EQ(row.delta_ci_low, 0.0) << where;
    EXPECT_EQ(row.delta_ci_high, 0.0) << where;
    if (row.metric == "kl_mean" || row.metric == "flip_rate" || row.metric == "rms_dp" ||
        row.metric == "c2w_rate" || row.metric == "w2c_rate" || row.metric == "mean_dp") {
      EXPECT_EQ(row.value, 0.0) << where;
    }
    if (row.metric == "top1_agree") {
      EXPECT_EQ(row.value, 1.0) << where;
    }
  }
  for (const auto& d : r.disparity) {
    if (d.on == "delta") {
      EXPECT_EQ(d.value, 0.0) << d.metric << " " << d.summary;
    }
  }
  for (const auto& k : acc.kl_quantiles(t)) {
    if (k.n_tokens == 0) continue;
    EXPECT_EQ(k.median, 0.0);
    EXPECT_EQ(k.p99, 0.0);
  }
}

TEST(LmEval, MetricDefinitions) {
  const auto defs = lm_metric_defs();
  const std::vector<std::pair<std::string, bool>> expect = {
      {"ppl", false},      {"nll", false},      {"kl_mean", false},  {"top1_agree", true},
      {"flip_rate", false}, {"acc", true},      {"c2w_rate", false}, {"w2c_rate", true},
      {"mean_dp", true},   {"rms_dp", false}};
  ASSERT_EQ(defs.size(), expect.size());
  double b[kLmBlockSize] = {};
  b[kLmTokens] = 4;
  b[kLmNllQ] = 8;
  b[kLmNllFp] = 6;
  b[kLmKl] = 0.4;
  b[kLmAgree] = 3;
  b[kLmCorrectQ] = 1;
  b[kLmCorrectFp] = 2;
  b[kLmC2w] = 2;
  b[kLmW2c] = 1;
  b[kLmDp] = -0.2;
  b[kLmDp2] = 0.09;
  const std::vector<std::pair<double, double>> vals = {
      {std::exp(2.0), std::exp(1.5)}, {2.0, 1.5}, {0.1, 0.0}, {0.75, 1.0}, {0.25, 0.0},
      {0.25, 0.5},                    {0.5, 0.0}, {0.25, 0.0}, {-0.05, 0.0}, {0.15, 0.0}};
  const double empty[kLmBlockSize] = {};
  for (size_t i = 0; i < defs.size(); ++i) {
    EXPECT_EQ(defs[i].name, expect[i].first);
    EXPECT_EQ(defs[i].higher_is_better, expect[i].second) << defs[i].name;
    ASSERT_TRUE(defs[i].reference) << defs[i].name;
    EXPECT_NEAR(defs[i].value(b), vals[i].first, 1e-15) << defs[i].name;
    EXPECT_NEAR(defs[i].reference(b), vals[i].second, 1e-15) << defs[i].name;
    EXPECT_TRUE(std::isnan(defs[i].value(empty))) << defs[i].name;
    EXPECT_TRUE(std::isnan(defs[i].reference(empty))) << defs[i].name;
  }
}

// ---- determinism ----

bool same_table(const UnitTable& a, const UnitTable& b) {
  return a.columns == b.columns && a.sums.rows() == b.sums.rows() &&
         a.sums.cols() == b.sums.cols() &&
         std::memcmp(a.sums.data(), b.sums.data(), sizeof(double) * a.sums.size()) == 0;
}

bool same_quantiles(const std::vector<KlSliceQuantiles>& a,
                    const std::vector<KlSliceQuantiles>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].slice_key != b[i].slice_key || a[i].slice_value != b[i].slice_value ||
        a[i].n_tokens != b[i].n_tokens || !same_bits(a[i].median, b[i].median) ||
        !same_bits(a[i].p99, b[i].p99))
      return false;
  return true;
}

LmEvalAccumulator accumulate_parallel(const Corpus& c, int threads) {
  LmEvalAccumulator acc = make_acc(static_cast<int>(c.unit_ids.size()), c.vocab);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  ParallelErrors errs;
  const long n = static_cast<long>(c.windows.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (long w = 0; w < n; ++w) {
    errs.run(w, [&] {
      const auto& win = c.windows[static_cast<size_t>(w)];
      acc.add_window(w, win.unit, win.ids, win.fp, win.q);
    });
  }
  omp_set_num_threads(saved);
  errs.rethrow();
  return acc;
}

TEST(LmEval, BitwiseIdenticalForOneAndTwoThreads) {
  const Corpus c = make_corpus(20);
  const LmEvalAccumulator one = accumulate_parallel(c, 1);
  const LmEvalAccumulator two = accumulate_parallel(c, 2);
  const UnitTable t1 = table_of(one, c), t2 = table_of(two, c);
  EXPECT_TRUE(same_table(t1, t2));
  EXPECT_TRUE(same_quantiles(one.kl_quantiles(t1), two.kl_quantiles(t2)));
  BootstrapOptions o;
  o.n_boot = 100;
  o.seed = 8;
  const SliceReport r1 = evaluate_slices(t1, lm_metric_defs(), o);
  const SliceReport r2 = evaluate_slices(t2, lm_metric_defs(), o);
  ASSERT_EQ(r1.rows.size(), r2.rows.size());
  for (size_t i = 0; i < r1.rows.size(); ++i) {
    EXPECT_TRUE(same_bits(r1.rows[i].value, r2.rows[i].value));
    EXPECT_TRUE(same_bits(r1.rows[i].delta_ci_low, r2.rows[i].delta_ci_low));
  }

  // Reverse insertion order, and a merge of even and odd windows: the same bits again.
  LmEvalAccumulator rev = make_acc(20, c.vocab), even = make_acc(20, c.vocab),
                    odd = make_acc(20, c.vocab);
  for (size_t w = c.windows.size(); w-- > 0;) {
    const auto& win = c.windows[w];
    rev.add_window(static_cast<int64_t>(w), win.unit, win.ids, win.fp, win.q);
    (w % 2 ? odd : even).add_window(static_cast<int64_t>(w), win.unit, win.ids, win.fp, win.q);
  }
  odd.merge(even);
  // The sequential form numbers windows in call order: the same as indices 0, 1, 2, ...
  LmEvalAccumulator seq = make_acc(20, c.vocab);
  for (const auto& win : c.windows) seq.add_window(win.unit, win.ids, win.fp, win.q);
  EXPECT_TRUE(same_table(t1, table_of(seq, c)));
  EXPECT_TRUE(same_table(t1, table_of(rev, c)));
  EXPECT_TRUE(same_table(t1, table_of(odd, c)));
  EXPECT_EQ(odd.n_windows(), static_cast<int64_t>(c.windows.size()));
  EXPECT_EQ(odd.scored_tokens(), one.scored_tokens());
}

// ---- KL quantiles ----

double sorted_quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  if (lo + 1 >= v.size()) return v.back();
  return v[lo] + (pos - static_cast<double>(lo)) * (v[lo + 1] - v[lo]);
}

TEST(LmEval, KlMedianAndP99AgainstASortedArray) {
  const Corpus c = make_corpus(14);
  const LmEvalAccumulator acc = accumulate(c);
  const UnitTable t = table_of(acc, c);
  // Every token's KL (as stored: float) with its slices, computed directly.
  std::map<std::pair<std::string, std::string>, std::vector<double>> by;
  const auto fb = freq_bucket_of(c.vocab);
  for (const auto& w : c.windows) {
    for (size_t p = 1; p < w.ids.size(); ++p) {
      const Index r = static_cast<Index>(p) - 1;
      const double kl = static_cast<float>(
          lm_score_token(w.fp.row(r).data(), w.q.row(r).data(), c.vocab, w.ids[p]).kl);
      by[{"__all__", "__all__"}].push_back(kl);
      by[{"source", c.source[static_cast<size_t>(w.unit)]}].push_back(kl);
      by[{"token_freq", kFreqNames[static_cast<size_t>(fb(w.ids[p]))]}].push_back(kl);
      by[{"position", kPosNames[static_cast<size_t>(pos_bucket_fn(static_cast<int64_t>(p)))]}]
          .push_back(kl);
    }
  }
  const auto rows = acc.kl_quantiles(t);
  // Same order as evaluate_slices' rows of one metric.
  BootstrapOptions o;
  o.n_boot = 0;
  const SliceReport r = evaluate_slices(t, {lm_metric_defs()[2]}, o);
  ASSERT_EQ(rows.size(), r.rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].slice_key, r.rows[i].slice_key);
    EXPECT_EQ(rows[i].slice_value, r.rows[i].slice_value);
    EXPECT_EQ(rows[i].n_tokens, r.rows[i].n_tokens);
    const auto& v = by.at({rows[i].slice_key, rows[i].slice_value});
    ASSERT_EQ(static_cast<int64_t>(v.size()), rows[i].n_tokens);
    EXPECT_DOUBLE_EQ(rows[i].median, sorted_quantile(v, 0.5)) << rows[i].slice_value;
    EXPECT_DOUBLE_EQ(rows[i].p99, sorted_quantile(v, 0.99)) << rows[i].slice_value;
    EXPECT_LE(rows[i].median, rows[i].p99);
  }
  const auto overall = acc.kl_quantiles_overall();
  ASSERT_EQ(overall.size(), 2u);
  EXPECT_EQ(overall[0].first, "kl_median");
  EXPECT_EQ(overall[1].first, "kl_p99");
  EXPECT_EQ(overall[0].second, rows[0].median);
  EXPECT_EQ(overall[1].second, rows[0].p99);
  // The filter form: the rare bucket at positions 16+ (p90).
  std::vector<double> sel;
  for (const auto& w : c.windows)
    for (size_t p = 16; p < w.ids.size(); ++p)
      if (fb(w.ids[p]) == 2)
        sel.push_back(static_cast<float>(lm_score_token(w.fp.row(static_cast<Index>(p) - 1).data(),
                                                        w.q.row(static_cast<Index>(p) - 1).data(),
                                                        c.vocab, w.ids[p])
                                             .kl));
  ASSERT_FALSE(sel.empty());
  EXPECT_DOUBLE_EQ(acc.kl_quantile([](int, int f, int p) { return f == 2 && p == 2; }, 0.9),
                   sorted_quantile(sel, 0.9));
  EXPECT_TRUE(std::isnan(acc.kl_quantile([](int, int, int) { return false; }, 0.5)));
}

// ---- scoring range and errors ----

TEST(LmEval, FirstScoredPositionLimitsTheScoredTokens) {
  const int V = 24;
  const Index T = 20;
  const auto ids = random_ids(T, V, 50);
  const Matrix fp = grid_logits(T, V, 50), q = perturb(fp, 0.5, 50);
  LmEvalAccumulator full = make_acc(1, V), half = make_acc(1, V);
  full.add_window(0, 0, ids, fp, q, 1);
  half.add_window(0, 0, ids, fp, q, 10);
  const UnitTable tf = full.unit_table({"d"}, {}, {}), th = half.unit_table({"d"}, {}, {});
  EXPECT_EQ(tf.sums(0, kLmTokens), 19.0);
  EXPECT_EQ(th.sums(0, kLmTokens), 10.0);
  double nll = 0;
  for (Index t = 10; t < T; ++t) nll += naive_nll(q.row(t - 1).data(), V, ids[static_cast<size_t>(t)]);
  EXPECT_NEAR(th.sums(0, kLmNllQ), nll, 10 * kScoreTol);  // a sum of 10 tokens
  // Positions 10..19: none in "1-3", 6 in "4-15", 4 in "16+".
  const Index p0 = 4 * kLmBlockSize;
  EXPECT_EQ(th.sums(0, p0 + kLmTokens), 0.0);
  EXPECT_EQ(th.sums(0, p0 + kLmBlockSize + kLmTokens), 6.0);
  EXPECT_EQ(th.sums(0, p0 + 2 * kLmBlockSize + kLmTokens), 4.0);
  // A window with nothing to score still counts as added.
  LmEvalAccumulator none = make_acc(1, V);
  none.add_window(0, 0, ids, fp, q, T);
  EXPECT_EQ(none.n_windows(), 1);
  EXPECT_EQ(none.unit_table({"d"}, {}, {}).sums.sum(), 0.0);
}

TEST(LmEval, RejectsBadInput) {
  const int V = 6;
  const std::vector<int32_t> ids = {1, 2, 3, 4};
  const Matrix fp = grid_logits(4, V, 60), q = perturb(fp, 0.1, 60);
  LmEvalAccumulator acc = make_acc(2, V);
  EXPECT_THROW(acc.add_window(0, 2, ids, fp, q), ShapeError);   // unit out of range
  EXPECT_THROW(acc.add_window(0, -1, ids, fp, q), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, ids, fp.topRows(3), q.topRows(3)), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, ids, fp, q.leftCols(5)), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, {1, 2, 3, 6}, fp, q), ShapeError);  // id >= vocab
  EXPECT_THROW(acc.add_window(0, 0, {1, -2, 3, 4}, fp, q), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, ids, fp, q, 0), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, ids, fp, q, 5), ShapeError);
  EXPECT_THROW(acc.add_window(0, 0, {}, Matrix(0, V), Matrix(0, V)), ShapeError);
  Matrix bad = q;
  bad(1, 3) = std::nanf("");
  EXPECT_THROW(acc.add_window(0, 0, ids, fp, bad), NumericError);
  bad(1, 3) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(acc.add_window(0, 0, ids, bad, q), NumericError);
  bad = q;
  bad(3, 0) = std::nanf("");  // the last row predicts nothing: never read
  EXPECT_NO_THROW(acc.add_window(7, 0, ids, fp, bad));
  EXPECT_EQ(acc.n_windows(), 1);
  EXPECT_THROW(acc.add_window(7, 1, ids, fp, q), Error);  // window index reused

  LmEvalAccumulator wild(1, {"a"}, [](int32_t) { return 1; }, {"p"}, [](int64_t) { return 0; });
  EXPECT_THROW(wild.add_window(0, 0, ids, fp, q), ShapeError);
  LmEvalAccumulator wild_pos(1, {"a"}, [](int32_t) { return 0; }, {"p"},
                             [](int64_t t) { return t == 3 ? -1 : 0; });
  EXPECT_THROW(wild_pos.add_window(0, 0, ids, fp, q), ShapeError);

  auto f0 = [](int32_t) { return 0; };
  auto p0 = [](int64_t) { return 0; };
  EXPECT_THROW(LmEvalAccumulator(1, {}, f0, {"p"}, p0), ConfigError);
  EXPECT_THROW(LmEvalAccumulator(1, {"a", "a"}, f0, {"p"}, p0), ConfigError);
  EXPECT_THROW(LmEvalAccumulator(1, {"a"}, nullptr, {"p"}, p0), ConfigError);
  EXPECT_THROW(LmEvalAccumulator(-1, {"a"}, f0, {"p"}, p0), ConfigError);

  LmEvalAccumulator other = make_acc(2, V);
  other.add_window(7, 1, ids, fp, q);
  EXPECT_THROW(acc.merge(other), Error);  // both hold window 7
  EXPECT_THROW(acc.merge(acc), Error);
  LmEvalAccumulator three = make_acc(3, V);
  EXPECT_THROW(acc.merge(three), Error);

  EXPECT_THROW(acc.unit_table({"only one"}, {}, {}), ShapeError);
  EXPECT_THROW(acc.unit_table({"a", "b"}, {"source"}, {{"x"}}), ShapeError);
  const UnitTable t = acc.unit_table({"a", "b"}, {"source"}, {{"x", "y"}});
  UnitTable short_table = t;
  short_table.unit_ids.pop_back();
  short_table.attrs[0].pop_back();
  EXPECT_THROW(acc.kl_quantiles(short_table), ShapeError);
  EXPECT_THROW(lm_column_name(kLmBlockSize), Error);
}

}  // namespace
}  // namespace ql
