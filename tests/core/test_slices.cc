#include "core/slices.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <map>

#include "core/error.h"
#include "core/rng.h"

namespace ql {
namespace {

// Columns of every test table.
enum Col { kTok, kNll, kNllRef, kAgree, kOnes, kNCols };

UnitTable empty_table(std::vector<std::string> attr_keys) {
  UnitTable t;
  t.attr_keys = std::move(attr_keys);
  t.attrs.resize(t.attr_keys.size());
  t.columns = {"n_tokens", "nll", "nll_ref", "agree", "ones"};
  t.sums = MatrixD(0, kNCols);
  return t;
}

void add_unit(UnitTable& t, const std::vector<std::string>& attrs, double tok, double nll,
              double nll_ref, double agree) {
  const Index u = t.n_units();
  t.unit_ids.push_back("u" + std::to_string(u));
  for (size_t k = 0; k < attrs.size(); ++k) t.attrs[k].push_back(attrs[k]);
  t.sums.conservativeResize(u + 1, kNCols);
  t.sums.row(u) << tok, nll, nll_ref, agree, 1.0;
}

// Mean NLL per token (lower is better), paired with the FP reference on the same units.
SliceMetricDef nll_metric() {
  SliceMetricDef m;
  m.name = "nll";
  m.value = [](const double* t) { return t[kNll] / t[kTok]; };
  m.reference = [](const double* t) { return t[kNllRef] / t[kTok]; };
  return m;
}

SliceMetricDef nll_ref_only_metric() {
  SliceMetricDef m;
  m.name = "nll_fp";
  m.value = [](const double* t) { return t[kNllRef] / t[kTok]; };
  return m;
}

SliceMetricDef agree_metric() {
  SliceMetricDef m;
  m.name = "agree";
  m.higher_is_better = true;
  m.value = [](const double* t) { return t[kAgree] / t[kTok]; };
  return m;
}

SliceMetricDef count_metric() {
  SliceMetricDef m;
  m.name = "units";
  m.value = [](const double* t) { return t[kOnes]; };
  return m;
}

// Units of one population: per-unit mean NLL mu_u (spread `spread` across units) for the FP
// reference and mu_u + shift + noise for the quantized variant, so value and reference are
// strongly correlated across units.
void add_population(UnitTable& t, const std::string& pop, int n, double base, double shift,
                    double spread, double noise, uint64_t stream) {
  CounterRng rng(99, stream);
  for (int i = 0; i < n; ++i) {
    const double tok = 50.0 + std::floor(100.0 * rng.uniform(4 * i));
    const double mu = base + spread * rng.normal(4 * i + 1);
    const double mq = mu + shift + noise * rng.normal(4 * i + 2);
    const double agree = std::floor(tok * (0.8 + 0.1 * rng.uniform(4 * i + 3)));
    add_unit(t, {pop}, tok, tok * mq, tok * mu, agree);
  }
}

const SliceRow& find_row(const SliceReport& r, const std::string& metric,
                         const std::string& key, const std::string& value) {
  for (const auto& row : r.rows)
    if (row.metric == metric && row.slice_key == key && row.slice_value == value) return row;
  throw std::runtime_error("row not found: " + metric + " " + key + "=" + value);
}

const DisparityRow& find_disp(const SliceReport& r, const std::string& metric,
                              const std::string& key, const std::string& summary,
                              const std::string& on) {
  for (const auto& d : r.disparity)
    if (d.metric == metric && d.slice_key == key && d.summary == summary && d.on == on) return d;
  throw std::runtime_error("disparity row not found: " + metric + " " + summary + " " + on);
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool identical(const SliceReport& a, const SliceReport& b) {
  if (a.rows.size() != b.rows.size() || a.disparity.size() != b.disparity.size()) return false;
  for (size_t i = 0; i < a.rows.size(); ++i) {
    const auto &x = a.rows[i], &y = b.rows[i];
    if (x.metric != y.metric || x.slice_key != y.slice_key || x.slice_value != y.slice_value ||
        x.n_units != y.n_units || x.n_tokens != y.n_tokens || x.flags != y.flags)
      return false;
    for (auto f : {&SliceRow::value, &SliceRow::ci_low, &SliceRow::ci_high, &SliceRow::ref_value,
                   &SliceRow::delta, &SliceRow::delta_ci_low, &SliceRow::delta_ci_high})
      if (!same_bits(x.*f, y.*f)) return false;
  }
  for (size_t i = 0; i < a.disparity.size(); ++i) {
    const auto &x = a.disparity[i], &y = b.disparity[i];
    if (x.summary != y.summary || x.on != y.on || x.worst_slice != y.worst_slice) return false;
    for (auto f : {&DisparityRow::value, &DisparityRow::ci_low, &DisparityRow::ci_high,
                   &DisparityRow::p_worst})
      if (!same_bits(x.*f, y.*f)) return false;
  }
  return true;
}

// Two populations crossed with two sources, small enough to compute by hand.
UnitTable hand_table() {
  UnitTable t = empty_table({"population", "source"});
  add_unit(t, {"b", "web"}, 10, 30, 20, 8);
  add_unit(t, {"a", "web"}, 20, 40, 36, 15);
  add_unit(t, {"a", "book"}, 30, 45, 42, 27);
  add_unit(t, {"b", "book"}, 40, 100, 88, 30);
  add_unit(t, {"a", "web"}, 25, 50, 40, 20);
  return t;
}

TEST(Slices, PointValuesEqualDirectComputation) {
  const UnitTable t = hand_table();
  BootstrapOptions o;
  o.n_boot = 50;
  const SliceReport r = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
  // Row order: per metric, overall then population {a, b} then source {book, web}.
  ASSERT_EQ(r.rows.size(), 10u);
  const std::vector<std::pair<std::string, std::string>> order = {
      {"__all__", "__all__"}, {"population", "a"}, {"population", "b"}, {"source", "book"},
      {"source", "web"}};
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(r.rows[i].metric, i < 5 ? "nll" : "agree");
    EXPECT_EQ(r.rows[i].slice_key, order[i % 5].first);
    EXPECT_EQ(r.rows[i].slice_value, order[i % 5].second);
  }
  struct Expect { std::string key, value; int64_t n, tok; double nll, ref, agree; };
  const std::vector<Expect> expect = {
      {"__all__", "__all__", 5, 125, 265.0 / 125, 226.0 / 125, 100.0 / 125},
      {"population", "a", 3, 75, 135.0 / 75, 118.0 / 75, 62.0 / 75},
      {"population", "b", 2, 50, 130.0 / 50, 108.0 / 50, 38.0 / 50},
      {"source", "book", 2, 70, 145.0 / 70, 130.0 / 70, 57.0 / 70},
      {"source", "web", 3, 55, 120.0 / 55, 96.0 / 55, 43.0 / 55}};
  for (const auto& e : expect) {
    const SliceRow& n = find_row(r, "nll", e.key, e.value);
    EXPECT_EQ(n.n_units, e.n);
    EXPECT_EQ(n.n_tokens, e.tok);
    EXPECT_NEAR(n.value, e.nll, 1e-14);
    EXPECT_NEAR(n.ref_value, e.ref, 1e-14);
    EXPECT_NEAR(n.delta, e.nll - e.ref, 1e-14);
    const SliceRow& a = find_row(r, "agree", e.key, e.value);
    EXPECT_NEAR(a.value, e.agree, 1e-14);
    EXPECT_TRUE(std::isnan(a.ref_value));
    EXPECT_TRUE(std::isnan(a.delta));
    EXPECT_TRUE(std::isnan(a.delta_ci_low));
    EXPECT_TRUE(std::isnan(a.delta_ci_high));
  }
}

TEST(Slices, ReplicatesFollowTheDocumentedDraws) {
  // With one replicate both CI bounds equal that replicate's value, which we rebuild from the
  // documented scheme: cells sorted by attribute tuple, draw j of cell c from
  // CounterRng(seed, mix_stream(b, c)).below(j, n_c).
  const UnitTable t = hand_table();
  BootstrapOptions o;
  o.n_boot = 1;
  o.seed = 1234;
  const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
  // Cells (population, source) in order: (a,book)={2}, (a,web)={1,4}, (b,book)={3}, (b,web)={0}.
  const std::vector<std::vector<Index>> cells = {{2}, {1, 4}, {3}, {0}};
  double nll = 0, tok = 0, nll_a = 0, tok_a = 0;
  for (size_t c = 0; c < cells.size(); ++c) {
    const CounterRng rng(o.seed, mix_stream(0, c));
    for (uint64_t j = 0; j < cells[c].size(); ++j) {
      const Index u = cells[c][rng.below(j, cells[c].size())];
      nll += t.sums(u, kNll);
      tok += t.sums(u, kTok);
      if (t.attrs[0][static_cast<size_t>(u)] == "a") {
        nll_a += t.sums(u, kNll);
        tok_a += t.sums(u, kTok);
      }
    }
  }
  const SliceRow& all = find_row(r, "nll", "__all__", "__all__");
  EXPECT_NEAR(all.ci_low, nll / tok, 1e-14);
  EXPECT_NEAR(all.ci_high, nll / tok, 1e-14);
  const SliceRow& a = find_row(r, "nll", "population", "a");
  EXPECT_NEAR(a.ci_low, nll_a / tok_a, 1e-14);
}

TEST(Slices, StratifiedReplicatesKeepCellSizes) {
  UnitTable t = empty_table({"population"});
  add_population(t, "a", 30, 2.0, 0.1, 0.3, 0.05, 1);
  add_population(t, "b", 7, 2.5, 0.2, 0.3, 0.05, 2);
  BootstrapOptions o;
  o.n_boot = 200;
  const SliceReport strat = evaluate_slices(t, {count_metric()}, o);
  for (const auto& row : strat.rows) {
    EXPECT_EQ(row.value, static_cast<double>(row.n_units));
    EXPECT_EQ(row.ci_low, row.value) << row.slice_value;
    EXPECT_EQ(row.ci_high, row.value) << row.slice_value;
  }
  // Without stratification only the total is fixed; the per-population sizes vary.
  o.stratify = false;
  const SliceReport iid = evaluate_slices(t, {count_metric()}, o);
  const SliceRow& all = find_row(iid, "units", "__all__", "__all__");
  EXPECT_EQ(all.ci_low, 37.0);
  EXPECT_EQ(all.ci_high, 37.0);
  const SliceRow& b = find_row(iid, "units", "population", "b");
  EXPECT_LT(b.ci_low, 7.0);
  EXPECT_GT(b.ci_high, 7.0);
}

TEST(Slices, CiContainsEstimateAndShrinksWithUnits) {
  BootstrapOptions o;
  o.n_boot = 400;
  double width[2];
  const int sizes[2] = {50, 800};
  for (int i = 0; i < 2; ++i) {
    UnitTable t = empty_table({"population"});
    add_population(t, "a", sizes[i], 2.0, 0.1, 0.4, 0.05, 10);
    const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
    const SliceRow& row = find_row(r, "nll", "__all__", "__all__");
    EXPECT_LT(row.ci_low, row.value);
    EXPECT_GT(row.ci_high, row.value);
    EXPECT_LT(row.delta_ci_low, row.delta);
    EXPECT_GT(row.delta_ci_high, row.delta);
    width[i] = row.ci_high - row.ci_low;
  }
  // 16x the units: about 4x narrower.
  EXPECT_LT(width[1], 0.5 * width[0]);
  EXPECT_GT(width[1], 0.1 * width[0]);
}

TEST(Slices, PairedDeltaCiIsNarrowerThanUnpaired) {
  UnitTable t = empty_table({"population"});
  add_population(t, "a", 200, 2.0, 0.1, 0.5, 0.02, 20);
  BootstrapOptions o;
  o.n_boot = 400;
  const SliceReport r = evaluate_slices(t, {nll_metric(), nll_ref_only_metric()}, o);
  const SliceRow& q = find_row(r, "nll", "__all__", "__all__");
  const SliceRow& fp = find_row(r, "nll_fp", "__all__", "__all__");
  EXPECT_NEAR(fp.value, q.ref_value, 1e-15);
  const double wq = q.ci_high - q.ci_low, wfp = fp.ci_high - fp.ci_low;
  const double wd = q.delta_ci_high - q.delta_ci_low;
  // An unpaired interval for the difference would be at least sqrt(wq² + wfp²) wide.
  EXPECT_LT(wd, 0.2 * std::sqrt(wq * wq + wfp * wfp));
  EXPECT_GT(wd, 0.0);
}

SliceReport disparity_example(int n_boot, uint64_t seed = 0, bool stratify = true) {
  UnitTable t = empty_table({"population", "split"});
  // Each population: tokens 100 total; NLL and reference chosen for round slice values:
  //   a: 2.0 vs 1.5, b: 3.0 vs 2.0, c: 2.5 vs 2.4 (NLL/token), plus small per-unit noise.
  const double q[3] = {2.0, 3.0, 2.5}, fp[3] = {1.5, 2.0, 2.4};
  const char* names[3] = {"c", "a", "b"};  // inserted out of order; reported sorted
  const int idx[3] = {2, 0, 1};
  for (int p = 0; p < 3; ++p) {
    const int i = idx[p];
    for (int k = 0; k < 4; ++k) {
      const double e = (k % 2 == 0 ? 0.01 : -0.01);  // cancels over the 4 equal-size units
      add_unit(t, {names[p], "test"}, 25, 25 * (q[i] + e), 25 * (fp[i] + e), 20 - i);
    }
  }
  BootstrapOptions o;
  o.n_boot = n_boot;
  o.seed = seed;
  o.stratify = stratify;
  return evaluate_slices(t, {nll_metric(), agree_metric()}, o);
}

TEST(Slices, DisparityHandExample) {
  const SliceReport r = disparity_example(300);
  const std::string P = "population";
  // Level: worst (max NLL) is b; gap 3 - 2; overall 7.5/3 = 2.5; ratio 2/3; amplification
  // gap(Q) - gap(FP) = 1.0 - 0.9.
  const DisparityRow& w = find_disp(r, "nll", P, "worst", "level");
  EXPECT_EQ(w.worst_slice, "b");
  EXPECT_NEAR(w.value, 3.0, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "gap_between", "level").value, 1.0, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "gap_to_overall", "level").value, 0.5, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "ratio_min_max", "level").value, 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "amplification", "level").value, 0.1, 1e-12);
  // Delta: 0.5, 1.0, 0.1; overall 2.5 - 5.9/3.
  const DisparityRow& dw = find_disp(r, "nll", P, "worst", "delta");
  EXPECT_EQ(dw.worst_slice, "b");
  EXPECT_NEAR(dw.value, 1.0, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "gap_between", "delta").value, 0.9, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", P, "gap_to_overall", "delta").value, 1.0 - (2.5 - 5.9 / 3.0),
              1e-12);
  // b is the worst in every replicate (noise is far smaller than the gaps); every row of the
  // group carries the group's worst slice and p_worst.
  for (const auto& d : r.disparity) {
    if (d.metric != "nll") continue;
    EXPECT_EQ(d.p_worst, 1.0) << d.summary << " " << d.on;
    EXPECT_EQ(d.worst_slice, "b");
    EXPECT_LE(d.ci_low, d.value + 1e-12) << d.summary << " " << d.on;
    EXPECT_GE(d.ci_high, d.value - 1e-12) << d.summary << " " << d.on;
  }
  // Higher-is-better metric: worst is the minimum (agree/token 18/25 for c), no delta rows,
  // no amplification. A family with one value (split) has no disparity rows.
  const DisparityRow& aw = find_disp(r, "agree", P, "worst", "level");
  EXPECT_EQ(aw.worst_slice, "c");
  EXPECT_NEAR(aw.value, 18.0 / 25.0, 1e-12);
  size_t n_nll = 0, n_agree = 0;
  for (const auto& d : r.disparity) {
    EXPECT_EQ(d.slice_key, P);
    (d.metric == "nll" ? n_nll : n_agree)++;
    if (d.metric == "agree") {
      EXPECT_EQ(d.on, "level");
    }
  }
  EXPECT_EQ(n_nll, 8u);
  EXPECT_EQ(n_agree, 4u);
  // Order: level summaries then delta summaries.
  EXPECT_EQ(r.disparity[0].summary, "worst");
  EXPECT_EQ(r.disparity[4].summary, "amplification");
  EXPECT_EQ(r.disparity[5].on, "delta");
}

TEST(Slices, SameSeedSameOutputDifferentSeedDifferentCis) {
  const SliceReport a = disparity_example(100, 5), b = disparity_example(100, 5);
  const SliceReport c = disparity_example(100, 6);
  EXPECT_TRUE(identical(a, b));
  EXPECT_FALSE(identical(a, c));
  for (size_t i = 0; i < a.rows.size(); ++i) EXPECT_EQ(a.rows[i].value, c.rows[i].value);
}

TEST(Slices, BitwiseIdenticalAcrossThreadCounts) {
  UnitTable t = empty_table({"population"});
  add_population(t, "a", 120, 2.0, 0.1, 0.4, 0.05, 30);
  add_population(t, "b", 40, 2.6, 0.3, 0.4, 0.05, 31);
  add_population(t, "c", 3, 2.2, 0.1, 0.4, 0.05, 32);
  for (bool stratify : {true, false}) {
    BootstrapOptions o;
    o.n_boot = 257;
    o.seed = 77;
    o.stratify = stratify;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const SliceReport one = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
    omp_set_num_threads(2);
    const SliceReport two = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
    omp_set_num_threads(saved);
    EXPECT_TRUE(identical(one, two)) << "stratify=" << stratify;
  }
}

TEST(Slices, UnstratifiedIgnoresReplicatesMissingASlice) {
  // "c" has one unit of 163: absent from about a third of i.i.d. replicates.
  UnitTable t = empty_table({"population"});
  add_population(t, "a", 120, 2.0, 0.1, 0.4, 0.05, 30);
  add_population(t, "b", 42, 2.6, 0.3, 0.4, 0.05, 31);
  add_population(t, "c", 1, 2.2, 0.1, 0.4, 0.05, 32);
  BootstrapOptions o;
  o.n_boot = 200;
  o.stratify = false;
  const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
  const SliceRow& c = find_row(r, "nll", "population", "c");
  // A single unit's ratio is the same in every replicate where it appears.
  EXPECT_NEAR(c.ci_low, c.value, 1e-14);
  EXPECT_NEAR(c.ci_high, c.value, 1e-14);
  const DisparityRow& g = find_disp(r, "nll", "population", "gap_between", "level");
  EXPECT_TRUE(std::isfinite(g.ci_low));
  EXPECT_TRUE(std::isfinite(g.ci_high));
  EXPECT_GT(g.p_worst, 0.0);
  EXPECT_LE(g.p_worst, 1.0);
}

TEST(Slices, Flags) {
  UnitTable t = empty_table({"population"});
  add_population(t, "big", 60, 2.0, 0.3, 0.4, 0.02, 40);   // >= 20 units, >= 2000 tokens
  add_population(t, "small", 3, 2.0, 0.3, 0.4, 0.02, 41);  // few units and tokens
  add_population(t, "noisy", 40, 2.0, 0.0, 0.4, 0.5, 42);  // delta ~ 0 with wide CI
  BootstrapOptions o;
  o.n_boot = 300;
  const SliceReport r = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
  const SliceRow& big = find_row(r, "nll", "population", "big");
  EXPECT_EQ(big.flags, 0u) << flags_to_string(big.flags);
  const SliceRow& small = find_row(r, "nll", "population", "small");
  EXPECT_TRUE(small.flags & kFlagFewUnits);
  EXPECT_TRUE(small.flags & kFlagFewTokens);
  EXPECT_FALSE(small.flags & kFlagEmpty);
  const SliceRow& noisy = find_row(r, "nll", "population", "noisy");
  EXPECT_TRUE(noisy.flags & kFlagImprecise) << noisy.delta << " [" << noisy.delta_ci_low << ", "
                                            << noisy.delta_ci_high << "]";
  EXPECT_FALSE(noisy.flags & kFlagFewUnits);
  // No reference, no delta: never imprecise.
  EXPECT_FALSE(find_row(r, "agree", "population", "noisy").flags & kFlagImprecise);
  EXPECT_EQ(flags_to_string(kFlagFewUnits | kFlagFewTokens), "few_units|few_tokens");
  EXPECT_EQ(flags_to_string(kFlagImprecise | kFlagEmpty), "imprecise|empty");
  EXPECT_EQ(flags_to_string(0), "");

  // An empty table: one overall row per metric, flagged empty, values NaN.
  const SliceReport e = evaluate_slices(empty_table({"population"}), {nll_metric()}, o);
  ASSERT_EQ(e.rows.size(), 1u);
  EXPECT_TRUE(e.rows[0].flags & kFlagEmpty);
  EXPECT_TRUE(std::isnan(e.rows[0].value));
  EXPECT_TRUE(std::isnan(e.rows[0].ci_low));
  EXPECT_TRUE(e.disparity.empty());
}

TEST(Slices, NoBootstrapGivesNanIntervals) {
  const SliceReport r = disparity_example(0);
  for (const auto& row : r.rows) {
    EXPECT_TRUE(std::isfinite(row.value));
    EXPECT_TRUE(std::isnan(row.ci_low));
    EXPECT_TRUE(std::isnan(row.ci_high));
    EXPECT_TRUE(std::isnan(row.delta_ci_low));
    EXPECT_TRUE(std::isnan(row.delta_ci_high));
    EXPECT_FALSE(row.flags & kFlagImprecise);
  }
  for (const auto& d : r.disparity) {
    EXPECT_TRUE(std::isfinite(d.value));
    EXPECT_TRUE(std::isnan(d.ci_low));
    EXPECT_TRUE(std::isnan(d.ci_high));
    EXPECT_TRUE(std::isnan(d.p_worst));
  }
  EXPECT_EQ(find_disp(r, "nll", "population", "worst", "level").worst_slice, "b");
}

TEST(Slices, RejectsInconsistentTables) {
  BootstrapOptions o;
  UnitTable t = hand_table();
  t.sums.conservativeResize(4, kNCols);
  EXPECT_THROW(evaluate_slices(t, {nll_metric()}, o), ShapeError);
  t = hand_table();
  t.attrs[1].pop_back();
  EXPECT_THROW(evaluate_slices(t, {nll_metric()}, o), ShapeError);
  t = hand_table();
  t.token_column = "tokens";
  EXPECT_THROW(evaluate_slices(t, {nll_metric()}, o), Error);
  EXPECT_THROW(t.column("nope"), Error);
  EXPECT_EQ(t.column("nll"), kNll);
  t = hand_table();
  o.ci_level = 1.0;
  EXPECT_THROW(evaluate_slices(t, {nll_metric()}, o), ConfigError);
  o.ci_level = 0.9;
  o.n_boot = -1;
  EXPECT_THROW(evaluate_slices(t, {nll_metric()}, o), ConfigError);
}

// ---- token slice families (column blocks) ----

// Per-unit statistics of one block, in Col order (kOnes is left 0 in bucket blocks).
struct BlockStats { double tok, nll, nll_ref, agree; };

// Blocks of kNCols columns: 0 = all tokens, 1 = bucket "rare", 2 = bucket "common". The
// family's values are declared out of sorted order to check that the declared order is kept.
UnitTable token_table(std::vector<std::string> attr_keys) {
  UnitTable t;
  t.attr_keys = std::move(attr_keys);
  t.attrs.resize(t.attr_keys.size());
  const char* names[kNCols] = {"n_tokens", "nll", "nll_ref", "agree", "ones"};
  for (const std::string prefix : {"", "rare/", "common/"})
    for (const char* n : names) t.columns.push_back(prefix + n);
  t.sums = MatrixD(0, 3 * kNCols);
  t.block_size = kNCols;
  t.token_families = {{"freq", {"rare", "common"}, {kNCols, 2 * kNCols}}};
  return t;
}

void add_token_unit(UnitTable& t, const std::vector<std::string>& attrs, const BlockStats& rare,
                    const BlockStats& common) {
  const Index u = t.n_units();
  t.unit_ids.push_back("u" + std::to_string(u));
  for (size_t k = 0; k < attrs.size(); ++k) t.attrs[k].push_back(attrs[k]);
  t.sums.conservativeResize(u + 1, 3 * kNCols);
  t.sums.row(u).setZero();
  const BlockStats all = {rare.tok + common.tok, rare.nll + common.nll,
                          rare.nll_ref + common.nll_ref, rare.agree + common.agree};
  const BlockStats* blocks[3] = {&all, &rare, &common};
  for (int b = 0; b < 3; ++b) {
    t.sums(u, b * kNCols + kTok) = blocks[b]->tok;
    t.sums(u, b * kNCols + kNll) = blocks[b]->nll;
    t.sums(u, b * kNCols + kNllRef) = blocks[b]->nll_ref;
    t.sums(u, b * kNCols + kAgree) = blocks[b]->agree;
  }
  t.sums(u, kOnes) = 1.0;
}

UnitTable hand_token_table() {
  UnitTable t = token_table({"population"});
  add_token_unit(t, {"a"}, {2, 8, 6, 1}, {8, 16, 12, 6});
  add_token_unit(t, {"a"}, {0, 0, 0, 0}, {10, 15, 14, 9});
  add_token_unit(t, {"b"}, {5, 20, 10, 2}, {15, 30, 27, 12});
  add_token_unit(t, {"b"}, {3, 9, 9, 1}, {7, 14, 7, 7});
  return t;
}

// Populations with per-unit bucket statistics correlated between Q and FP.
UnitTable random_token_table(const std::vector<std::pair<std::string, int>>& pops,
                             uint64_t stream) {
  UnitTable t = token_table({"population"});
  CounterRng rng(7, stream);
  uint64_t i = 0;
  for (const auto& [pop, n] : pops) {
    for (int k = 0; k < n; ++k, i += 8) {
      const double rt = std::floor(20.0 * rng.uniform(i));
      const double ct = 40.0 + std::floor(60.0 * rng.uniform(i + 1));
      const double mr = 4.0 + 0.5 * rng.normal(i + 2), mc = 2.0 + 0.3 * rng.normal(i + 3);
      const double sr = 0.6 + 0.05 * rng.normal(i + 4), sc = 0.1 + 0.02 * rng.normal(i + 5);
      add_token_unit(t, {pop}, {rt, rt * (mr + sr), rt * mr, std::floor(0.5 * rt)},
                     {ct, ct * (mc + sc), ct * mc, std::floor(0.8 * ct)});
    }
  }
  return t;
}

TEST(SlicesTokenFamilies, PointValuesEqualDirectComputationOnBucketColumns) {
  const UnitTable t = hand_token_table();
  BootstrapOptions o;
  o.n_boot = 50;
  const SliceReport r = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
  // Per metric: overall, population {a, b}, then freq in declared order {rare, common}.
  ASSERT_EQ(r.rows.size(), 10u);
  const std::vector<std::pair<std::string, std::string>> order = {
      {"__all__", "__all__"}, {"population", "a"}, {"population", "b"}, {"freq", "rare"},
      {"freq", "common"}};
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(r.rows[i].slice_key, order[i % 5].first);
    EXPECT_EQ(r.rows[i].slice_value, order[i % 5].second);
  }
  struct Expect { std::string key, value; int64_t n, tok; double nll, ref, agree; };
  const std::vector<Expect> expect = {
      {"__all__", "__all__", 4, 50, 112.0 / 50, 85.0 / 50, 38.0 / 50},
      {"population", "a", 2, 20, 39.0 / 20, 32.0 / 20, 16.0 / 20},
      {"population", "b", 2, 30, 73.0 / 30, 53.0 / 30, 22.0 / 30},
      // Unit 1 has no rare tokens: 3 units contribute to the bucket.
      {"freq", "rare", 3, 10, 37.0 / 10, 25.0 / 10, 4.0 / 10},
      {"freq", "common", 4, 40, 75.0 / 40, 60.0 / 40, 34.0 / 40}};
  for (const auto& e : expect) {
    const SliceRow& n = find_row(r, "nll", e.key, e.value);
    EXPECT_EQ(n.n_units, e.n) << e.key << "=" << e.value;
    EXPECT_EQ(n.n_tokens, e.tok) << e.key << "=" << e.value;
    EXPECT_NEAR(n.value, e.nll, 1e-14);
    EXPECT_NEAR(n.ref_value, e.ref, 1e-14);
    EXPECT_NEAR(n.delta, e.nll - e.ref, 1e-14);
    EXPECT_LE(n.ci_low, n.ci_high);
    EXPECT_NEAR(find_row(r, "agree", e.key, e.value).value, e.agree, 1e-14);
  }
}

TEST(SlicesTokenFamilies, ReplicatesShareTheDesignIndexSets) {
  // One replicate: the token rows are the bucket ratios over the very units drawn for the
  // design rows (cells a = {0, 1}, b = {2, 3}), so their deltas are paired with everything.
  const UnitTable t = hand_token_table();
  BootstrapOptions o;
  o.n_boot = 1;
  o.seed = 4321;
  const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
  const std::vector<std::vector<Index>> cells = {{0, 1}, {2, 3}};
  double tot[3] = {0, 0, 0}, nll[3] = {0, 0, 0}, ref[3] = {0, 0, 0};
  for (size_t c = 0; c < cells.size(); ++c) {
    const CounterRng rng(o.seed, mix_stream(0, c));
    for (uint64_t j = 0; j < cells[c].size(); ++j) {
      const Index u = cells[c][rng.below(j, cells[c].size())];
      for (int b = 0; b < 3; ++b) {
        tot[b] += t.sums(u, b * kNCols + kTok);
        nll[b] += t.sums(u, b * kNCols + kNll);
        ref[b] += t.sums(u, b * kNCols + kNllRef);
      }
    }
  }
  const char* names[3] = {"__all__", "rare", "common"};
  for (int b = 0; b < 3; ++b) {
    const SliceRow& row = find_row(r, "nll", b == 0 ? "__all__" : "freq", names[b]);
    EXPECT_NEAR(row.ci_low, nll[b] / tot[b], 1e-14) << names[b];
    EXPECT_NEAR(row.ci_high, nll[b] / tot[b], 1e-14) << names[b];
    EXPECT_NEAR(row.delta_ci_low, (nll[b] - ref[b]) / tot[b], 1e-14) << names[b];
  }
}

TEST(SlicesTokenFamilies, PairedDeltaCiIsNarrowerThanUnpaired) {
  const UnitTable t = random_token_table({{"a", 150}}, 3);
  BootstrapOptions o;
  o.n_boot = 400;
  const SliceReport r = evaluate_slices(t, {nll_metric(), nll_ref_only_metric()}, o);
  for (const std::string v : {"rare", "common"}) {
    const SliceRow& q = find_row(r, "nll", "freq", v);
    const SliceRow& fp = find_row(r, "nll_fp", "freq", v);
    EXPECT_EQ(fp.value, q.ref_value);
    const double wq = q.ci_high - q.ci_low, wfp = fp.ci_high - fp.ci_low;
    const double wd = q.delta_ci_high - q.delta_ci_low;
    EXPECT_GT(wd, 0.0) << v;
    EXPECT_LT(wd, 0.5 * std::sqrt(wq * wq + wfp * wfp)) << v;
    EXPECT_LT(q.delta_ci_low, q.delta);
    EXPECT_GT(q.delta_ci_high, q.delta);
  }
}

TEST(SlicesTokenFamilies, DisparityRowsForATokenFamily) {
  const SliceReport r = evaluate_slices(hand_token_table(), {nll_metric(), agree_metric()},
                                        [] { BootstrapOptions o; o.n_boot = 200; return o; }());
  const std::string F = "freq";
  // Levels: rare 3.7, common 1.875, overall 2.24 (the all-tokens block); FP 2.5, 1.5.
  const DisparityRow& w = find_disp(r, "nll", F, "worst", "level");
  EXPECT_EQ(w.worst_slice, "rare");
  EXPECT_NEAR(w.value, 3.7, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "gap_between", "level").value, 1.825, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "gap_to_overall", "level").value, 3.7 - 2.24, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "ratio_min_max", "level").value, 1.875 / 3.7, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "amplification", "level").value, 1.825 - 1.0, 1e-12);
  // Deltas: rare 1.2, common 0.375, overall 27/50.
  const DisparityRow& dw = find_disp(r, "nll", F, "worst", "delta");
  EXPECT_EQ(dw.worst_slice, "rare");
  EXPECT_NEAR(dw.value, 1.2, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "gap_between", "delta").value, 0.825, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", F, "gap_to_overall", "delta").value, 1.2 - 0.54, 1e-12);
  // Higher is better: the worst agreement is rare (0.4 vs 0.85).
  EXPECT_EQ(find_disp(r, "agree", F, "worst", "level").worst_slice, "rare");
  // Per metric, the design family's summaries come first, then the token family's.
  std::vector<std::string> order;
  for (const auto& d : r.disparity) {
    const std::string group = d.metric + "/" + d.slice_key;
    if (order.empty() || order.back() != group) order.push_back(group);
  }
  EXPECT_EQ(order, (std::vector<std::string>{"nll/population", "nll/freq", "agree/population",
                                             "agree/freq"}));
  size_t n_freq = 0;
  for (const auto& d : r.disparity) n_freq += d.slice_key == F;
  EXPECT_EQ(n_freq, 8u + 4u);
  for (const auto& d : r.disparity) {
    if (d.slice_key != F || d.metric != "nll") continue;
    EXPECT_LE(d.ci_low, d.value + 1e-12) << d.summary << " " << d.on;
    EXPECT_GE(d.ci_high, d.value - 1e-12) << d.summary << " " << d.on;
  }
}

// A bucket no unit has tokens in (the shared model's token_freq '>10k' on a short stream) is
// an empty row; the family's summaries are over the other buckets, not NaN.
TEST(SlicesTokenFamilies, AnEmptyBucketIsLeftOutOfItsFamilysSummaries) {
  UnitTable t = hand_token_table();
  const Index n0 = static_cast<Index>(t.columns.size());
  for (const char* n : {"n_tokens", "nll", "nll_ref", "agree", "ones"}) t.columns.push_back(std::string("mid/") + n);
  t.sums.conservativeResize(t.n_units(), n0 + kNCols);
  t.sums.rightCols(kNCols).setZero();
  t.token_families = {{"freq", {"rare", "mid", "common"}, {kNCols, n0, 2 * kNCols}}};
  BootstrapOptions o;
  o.n_boot = 100;
  const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
  const SliceRow& mid = find_row(r, "nll", "freq", "mid");
  EXPECT_EQ(mid.n_units, 0);
  EXPECT_TRUE(mid.flags & kFlagEmpty);
  EXPECT_TRUE(std::isnan(mid.value));
  // As without the empty bucket (DisparityRowsForATokenFamily).
  const DisparityRow& w = find_disp(r, "nll", "freq", "worst", "level");
  EXPECT_EQ(w.worst_slice, "rare");
  EXPECT_NEAR(w.value, 3.7, 1e-12);
  EXPECT_TRUE(std::isfinite(w.ci_low) && std::isfinite(w.ci_high));
  EXPECT_NEAR(find_disp(r, "nll", "freq", "gap_between", "level").value, 1.825, 1e-12);
  EXPECT_NEAR(find_disp(r, "nll", "freq", "worst", "delta").value, 1.2, 1e-12);
  // With one bucket left there is nothing to compare: no summaries for the family.
  for (Index u = 0; u < t.n_units(); ++u) t.sums.block(u, kNCols, 1, kNCols).setZero();
  const SliceReport one = evaluate_slices(t, {nll_metric()}, o);
  for (const auto& d : one.disparity) EXPECT_NE(d.slice_key, "freq") << d.summary;
}

TEST(SlicesTokenFamilies, DesignRowsUnchangedByBlocks) {
  // The blocked table and a plain table holding only its all-tokens block must give bitwise
  // the same overall and design rows and design disparity (same draws, same totals).
  const UnitTable blocked = random_token_table({{"a", 40}, {"b", 9}, {"c", 25}}, 5);
  UnitTable plain = blocked;
  plain.columns.resize(kNCols);
  plain.sums = blocked.sums.leftCols(kNCols).eval();
  plain.block_size = 0;
  plain.token_families.clear();
  for (bool stratify : {true, false}) {
    BootstrapOptions o;
    o.n_boot = 150;
    o.seed = 11;
    o.stratify = stratify;
    const std::vector<SliceMetricDef> defs = {nll_metric(), agree_metric()};
    const SliceReport rb = evaluate_slices(blocked, defs, o);
    const SliceReport rp = evaluate_slices(plain, defs, o);
    SliceReport kept;
    for (const auto& row : rb.rows)
      if (row.slice_key != "freq") kept.rows.push_back(row);
    for (const auto& d : rb.disparity)
      if (d.slice_key != "freq") kept.disparity.push_back(d);
    EXPECT_TRUE(identical(kept, rp)) << "stratify=" << stratify;
    EXPECT_EQ(rb.rows.size(), rp.rows.size() + 2 * 2);
  }
}

TEST(SlicesTokenFamilies, BucketAbsentFromSomeReplicates) {
  // Only one unit of 60 has rare tokens: i.i.d. replicates without it leave the bucket empty
  // (NaN, ignored), the others reproduce that unit's ratio.
  UnitTable t = token_table({"population"});
  for (int i = 0; i < 60; ++i) {
    const BlockStats rare = i == 17 ? BlockStats{4, 10, 6, 1} : BlockStats{0, 0, 0, 0};
    add_token_unit(t, {"a"}, rare, {50, 100.0 + i, 90.0 + i, 40});
  }
  BootstrapOptions o;
  o.n_boot = 200;
  o.stratify = false;
  const SliceReport r = evaluate_slices(t, {nll_metric()}, o);
  const SliceRow& rare = find_row(r, "nll", "freq", "rare");
  EXPECT_EQ(rare.n_units, 1);
  EXPECT_EQ(rare.n_tokens, 4);
  EXPECT_TRUE(rare.flags & kFlagFewUnits);
  EXPECT_TRUE(rare.flags & kFlagFewTokens);
  EXPECT_NEAR(rare.value, 2.5, 1e-14);
  EXPECT_NEAR(rare.ci_low, 2.5, 1e-14);
  EXPECT_NEAR(rare.ci_high, 2.5, 1e-14);
  EXPECT_NEAR(rare.delta_ci_low, 1.0, 1e-14);
  EXPECT_EQ(find_row(r, "nll", "freq", "common").n_units, 60);
}

TEST(SlicesTokenFamilies, BitwiseIdenticalAcrossThreadCounts) {
  const UnitTable t = random_token_table({{"a", 70}, {"b", 20}, {"c", 2}}, 9);
  for (bool stratify : {true, false}) {
    BootstrapOptions o;
    o.n_boot = 201;
    o.seed = 3;
    o.stratify = stratify;
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const SliceReport one = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
    omp_set_num_threads(2);
    const SliceReport two = evaluate_slices(t, {nll_metric(), agree_metric()}, o);
    omp_set_num_threads(saved);
    EXPECT_TRUE(identical(one, two)) << "stratify=" << stratify;
  }
}

TEST(SlicesTokenFamilies, RejectsMalformedBlocks) {
  BootstrapOptions o;
  o.n_boot = 0;
  const auto run = [&](const UnitTable& t) { evaluate_slices(t, {nll_metric()}, o); };
  EXPECT_NO_THROW(run(hand_token_table()));
  UnitTable t = hand_token_table();
  t.token_families[0].offsets[1] = 2 * kNCols + 1;  // block runs past the last column
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.token_families[0].offsets.pop_back();
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.block_size = 0;  // token families without blocks
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.block_size = 3 * kNCols + 1;
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.token_column = "rare/n_tokens";  // not inside the first block
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.token_column = "";
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.token_families[0].key = "population";
  EXPECT_THROW(run(t), ShapeError);
  t = hand_token_table();
  t.token_families[0].values[1] = "rare";
  EXPECT_THROW(run(t), ShapeError);
}

TEST(Slices, QuantileLinearMatchesNumpyDefault) {
  // numpy.quantile([3, 1, 4, 1, 5], q) with the linear method.
  const std::vector<double> v = {3, 1, 4, 1, 5};
  EXPECT_EQ(quantile_linear(v, 0.0), 1.0);
  EXPECT_EQ(quantile_linear(v, 0.5), 3.0);
  EXPECT_DOUBLE_EQ(quantile_linear(v, 0.9), 4.6);
  EXPECT_EQ(quantile_linear(v, 1.0), 5.0);
  EXPECT_DOUBLE_EQ(quantile_linear({2.0, std::nan(""), 4.0}, 0.25), 2.5);
  EXPECT_TRUE(std::isnan(quantile_linear({}, 0.5)));
}

}  // namespace
}  // namespace ql
