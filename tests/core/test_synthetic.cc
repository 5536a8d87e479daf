#include "core/synthetic.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/config_node.h"
#include "core/error.h"
#include "core/rng.h"

namespace ql {
namespace {

SyntheticSpec parse_spec(const std::string& yaml) {
  ConfigNode root = ConfigNode::parse(yaml, "test.yaml");
  return synthetic_spec_schema().parse(root, "workload");
}

std::string emit_text(const SyntheticSpec& s) { return synthetic_spec_schema().emit(s).to_yaml(); }

// The ConfigError thrown by parsing `yaml`, or fails the test.
ConfigError parse_error(const std::string& yaml) {
  try {
    parse_spec(yaml);
  } catch (const ConfigError& e) {
    return e;
  }
  ADD_FAILURE() << "expected a ConfigError for:\n" << yaml;
  return ConfigError({}, "", "");
}

SyntheticPopulationSpec population(const std::string& name, double share, double shift = 0.0) {
  SyntheticPopulationSpec p;
  p.name = name;
  p.share = share;
  p.shift = shift;
  return p;
}

// A small suite that generates quickly.
SyntheticSpec small_spec() {
  SyntheticSpec s;
  s.layers = {{"q", 32, 48, 2}, {"down", 64, 16, 1}};
  s.calib_tokens = 300;
  s.eval_units = 10;
  s.unit_tokens = 8;
  return s;
}

bool bitwise_equal(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::equal(a.data(), a.data() + a.size(), b.data(),
                    [](float x, float y) { return std::memcmp(&x, &y, sizeof x) == 0; });
}

bool suites_equal(const SyntheticSuite& a, const SyntheticSuite& b) {
  if (a.layers.size() != b.layers.size() || a.unit_ids != b.unit_ids ||
      a.unit_population != b.unit_population)
    return false;
  for (std::size_t l = 0; l < a.layers.size(); ++l)
    if (a.layers[l].name != b.layers[l].name || !bitwise_equal(a.layers[l].W, b.layers[l].W) ||
        !bitwise_equal(a.layers[l].X_calib, b.layers[l].X_calib) ||
        !bitwise_equal(a.layers[l].X_eval, b.layers[l].X_eval))
      return false;
  return true;
}

// Per-channel max |x| over a set of rows.
VectorD channel_absmax(const Matrix& X, Index r0, Index n) {
  return X.middleRows(r0, n).cwiseAbs().colwise().maxCoeff().transpose().cast<double>();
}

double excess_kurtosis(const Matrix& W) {
  const double n = static_cast<double>(W.size());
  double mean = 0;
  for (Index i = 0; i < W.size(); ++i) mean += W.data()[i];
  mean /= n;
  double m2 = 0, m4 = 0;
  for (Index i = 0; i < W.size(); ++i) {
    double d = W.data()[i] - mean;
    m2 += d * d;
    m4 += d * d * d * d;
  }
  m2 /= n;
  m4 /= n;
  return m4 / (m2 * m2) - 3.0;
}

// ---------------------------------------------------------------- schema

TEST(SyntheticSchema, DefaultsWhenSectionEmpty) {
  SyntheticSpec s = parse_spec("{}");
  ASSERT_EQ(s.layers.size(), 4u);
  EXPECT_EQ(s.layers[0].name, "attn.qkv");
  EXPECT_EQ(s.layers[0].d_in, 256);
  EXPECT_EQ(s.layers[0].d_out, 768);
  EXPECT_EQ(s.layers[3].name, "mlp.down");
  EXPECT_EQ(s.layers[3].d_in, 1024);
  EXPECT_EQ(s.weight_dist, WeightDist::StudentT);
  EXPECT_EQ(s.weight_df, 5.0);
  EXPECT_EQ(s.input_decay, 0.7);
  EXPECT_EQ(s.outlier_channels, 4);
  EXPECT_EQ(s.outlier_magnitude, 10.0);
  EXPECT_EQ(s.calib_tokens, 1024);
  EXPECT_EQ(s.eval_units, 128);
  EXPECT_EQ(s.unit_tokens, 32);
  ASSERT_EQ(s.populations.size(), 2u);
  EXPECT_EQ(s.populations[0].name, "majority");
  EXPECT_EQ(s.populations[0].share, 0.8);
  EXPECT_FALSE(s.populations[0].input_decay.has_value());
  EXPECT_EQ(s.populations[1].name, "minority");
  EXPECT_EQ(*s.populations[1].outlier_channels, 8);
  EXPECT_EQ(*s.populations[1].outlier_magnitude, 25.0);
  EXPECT_EQ(*s.populations[1].input_decay, 0.4);
  EXPECT_TRUE(s.calib_populations.empty());
  EXPECT_NO_THROW(validate_synthetic_spec(s));
}

TEST(SyntheticSchema, ParsesListsAndOverrides) {
  SyntheticSpec s = parse_spec(R"(
layers:
  - {name: blk.qkv, d_in: 64, d_out: 192, count: 3}
  - {name: blk.down, d_in: 128, d_out: 64}
weight_dist: gaussian
input_decay: 0.5
populations:
  - {name: a, share: 0.5}
  - {name: b, share: 0.25, shift: 1.5, outlier_magnitude: 40}
  - {name: c, share: 0.25, outlier_channels: 0}
)");
  ASSERT_EQ(s.layers.size(), 2u);
  EXPECT_EQ(s.layers[0].count, 3);
  EXPECT_EQ(s.layers[1].count, 1);
  EXPECT_EQ(s.weight_dist, WeightDist::Gaussian);
  EXPECT_EQ(s.populations[1].shift, 1.5);
  EXPECT_EQ(*s.populations[1].outlier_magnitude, 40.0);
  EXPECT_FALSE(s.populations[1].outlier_channels.has_value());
  EXPECT_EQ(*s.populations[2].outlier_channels, 0);
  EXPECT_EQ(synthetic_layer_names(s),
            (std::vector<std::string>{"blk.qkv.0", "blk.qkv.1", "blk.qkv.2", "blk.down"}));
}

TEST(SyntheticSchema, EmitRoundTripIsCanonical) {
  const std::string custom = R"(
layers:
  - {name: x, d_in: 16, d_out: 8, count: 2}
weight_df: 7.5
populations:
  - {name: a, share: 0.6}
  - {name: b, share: 0.4, input_decay: 0.2, shift: -0.5}
)";
  for (const SyntheticSpec& s : {SyntheticSpec{}, parse_spec(custom)}) {
    std::string once = emit_text(s);
    ConfigNode reparsed = ConfigNode::parse(once, "emitted.yaml");
    std::string twice = emit_text(synthetic_spec_schema().parse(reparsed, "workload"));
    EXPECT_EQ(once, twice);
  }
  // Resolved form: overrides filled from the suite level.
  ConfigNode e = synthetic_spec_schema().emit(parse_spec(custom));
  const ConfigNode* pops = e.find("populations");
  ASSERT_TRUE(pops && pops->is_sequence());
  EXPECT_EQ(pops->at(0).find("input_decay")->value(), "0.7");
  EXPECT_EQ(pops->at(0).find("outlier_channels")->value(), "4");
  EXPECT_EQ(pops->at(1).find("input_decay")->value(), "0.2");
  // Data sizes are not workload keys (the experiment's calib:/eval: sections set them).
  EXPECT_EQ(e.find("calib_populations"), nullptr);
  EXPECT_EQ(e.find("eval_units"), nullptr);
  EXPECT_EQ(e.find("layers")->at(0).find("count")->value(), "2");

  // Equal workloads written differently emit identically (hence hash equally).
  std::string explicit_form = emit_text(parse_spec(R"(
layers: [{name: x, d_in: 16, d_out: 8, count: 2}]
weight_df: 7.5
populations:
  - {name: a, share: 0.6, input_decay: 0.7, outlier_channels: 4, outlier_magnitude: 10, shift: 0}
  - {name: b, share: 0.4, input_decay: 0.2, shift: -0.5}
)"));
  EXPECT_EQ(emit_text(parse_spec(custom)), explicit_form);
  // ... and different workloads differently.
  SyntheticSpec other = parse_spec(custom);
  other.populations[1].shift = 0.5;
  EXPECT_NE(emit_text(other), explicit_form);
}

TEST(SyntheticSchema, SharesMustSumToOne) {
  ConfigError e = parse_error(R"(
populations:
  - {name: a, share: 0.5}
  - {name: b, share: 0.4}
)");
  EXPECT_EQ(e.key_path(), "workload.populations");
  EXPECT_EQ(e.loc().line, 3);  // the list itself
  EXPECT_NE(e.detail().find("sum to 1"), std::string::npos) << e.what();
}

// The calibration populations and data sizes come from the experiment's calib:/eval:
// sections (tested with locations in tests/experiments); the spec validator checks them.
ConfigError validate_error(const SyntheticSpec& s) {
  try {
    validate_synthetic_spec(s);
  } catch (const ConfigError& e) {
    return e;
  }
  ADD_FAILURE() << "expected a ConfigError";
  return ConfigError({}, "", "");
}

TEST(SyntheticSchema, UnknownCalibPopulationSuggestsClosest) {
  SyntheticSpec s;
  s.calib_populations = {"majority", "minorty"};
  ConfigError e = validate_error(s);
  EXPECT_EQ(e.key_path(), "workload.calib_populations.1");
  EXPECT_NE(e.detail().find("did you mean 'minority'"), std::string::npos) << e.what();
  EXPECT_NE(e.detail().find("minorty"), std::string::npos);
  s.calib_populations = {"majority", "majority"};
  EXPECT_EQ(validate_error(s).key_path(), "workload.calib_populations.1");
  EXPECT_EQ(parse_error("calib_populations: [majority]\n").key_path(),
            "workload.calib_populations");  // not a workload key
}

TEST(SyntheticSchema, OutlierChannelsBoundedByDin) {
  ConfigError e = parse_error("layers: [{name: tiny, d_in: 3, d_out: 8}]\n");
  // Suite-level default 4 > d_in 3.
  EXPECT_EQ(e.key_path(), "workload.outlier_channels");
  EXPECT_NE(e.detail().find("tiny"), std::string::npos) << e.what();
  // A population override beyond d_in is reported at that population's key.
  ConfigError p = parse_error(R"(
layers: [{name: l, d_in: 6, d_out: 8}]
populations:
  - {name: a, share: 0.5}
  - {name: b, share: 0.5, outlier_channels: 7}
)");
  EXPECT_EQ(p.key_path(), "workload.populations.1.outlier_channels");
  EXPECT_EQ(p.loc().line, 5);
  // Equality is allowed.
  EXPECT_NO_THROW(parse_spec(R"(
layers: [{name: l, d_in: 6, d_out: 8}]
outlier_channels: 6
populations: [{name: a, share: 1, outlier_channels: 6}]
)"));
}

TEST(SyntheticSchema, OtherValidationErrors) {
  // Duplicate names after count expansion.
  ConfigError dup = parse_error(R"(
layers:
  - {name: blk, d_in: 16, d_out: 16, count: 2}
  - {name: blk.1, d_in: 16, d_out: 16}
)");
  EXPECT_EQ(dup.key_path(), "workload.layers.1.name");
  EXPECT_NE(dup.detail().find("blk.1"), std::string::npos) << dup.what();
  // Unknown key inside a layer, with suggestion.
  ConfigError unk = parse_error("layers: [{name: a, d_inn: 16, d_out: 16}]\n");
  EXPECT_EQ(unk.key_path(), "workload.layers.0.d_inn");
  EXPECT_NE(unk.detail().find("did you mean 'd_in'"), std::string::npos) << unk.what();
  // Missing required name.
  EXPECT_EQ(parse_error("layers: [{d_in: 16, d_out: 16}]\n").key_path(), "workload.layers.0");
  // Range checks.
  EXPECT_EQ(parse_error("layers: [{name: a, d_in: 0, d_out: 16}]\n").key_path(),
            "workload.layers.0.d_in");
  EXPECT_EQ(parse_error("weight_df: 2\n").key_path(), "workload.weight_df");
  SyntheticSpec one_unit;
  one_unit.eval_units = 1;
  EXPECT_EQ(validate_error(one_unit).key_path(), "workload.eval_units");
  EXPECT_EQ(parse_error("outlier_magnitude: 0.5\n").key_path(), "workload.outlier_magnitude");
  EXPECT_EQ(parse_error("weight_dist: cauchy\n").key_path(), "workload.weight_dist");
  EXPECT_EQ(parse_error("populations: [{name: a, share: 0}]\n").key_path(),
            "workload.populations.0.share");
  EXPECT_EQ(parse_error("populations: [{name: a, share: 0.5}, {name: a, share: 0.5}]\n")
                .key_path(),
            "workload.populations.1.name");
  EXPECT_EQ(parse_error("bogus: 1\n").key_path(), "workload.bogus");
  SyntheticSpec huge;
  huge.eval_units = 100000;
  huge.unit_tokens = 1000;
  EXPECT_EQ(validate_error(huge).key_path(), "workload.unit_tokens");
  // A population left without any evaluation unit.
  SyntheticSpec four;
  four.eval_units = 4;
  four.populations = {population("big", 0.9), population("rare", 0.1)};
  ConfigError few = validate_error(four);
  EXPECT_EQ(few.key_path(), "workload.eval_units");
  EXPECT_NE(few.detail().find("rare"), std::string::npos) << few.what();
  // Specs built in code are checked by generate_suite too.
  SyntheticSpec bad = small_spec();
  bad.populations[0].share = 0.7;
  EXPECT_THROW(generate_suite(bad, 1), ConfigError);
}

// ---------------------------------------------------------------- generation

TEST(SyntheticGeneration, ShapesNamesAndUnits) {
  SyntheticSpec s = small_spec();
  SyntheticSuite suite = generate_suite(s, 7);
  ASSERT_EQ(suite.layers.size(), 3u);
  EXPECT_EQ(suite.layers[0].name, "q.0");
  EXPECT_EQ(suite.layers[1].name, "q.1");
  EXPECT_EQ(suite.layers[2].name, "down");
  for (auto& L : suite.layers) {
    const Index d_in = L.name == "down" ? 64 : 32, d_out = L.name == "down" ? 16 : 48;
    EXPECT_EQ(L.W.rows(), d_out);
    EXPECT_EQ(L.W.cols(), d_in);
    EXPECT_EQ(L.X_calib.rows(), 300);
    EXPECT_EQ(L.X_calib.cols(), d_in);
    EXPECT_EQ(L.X_eval.rows(), 10 * 8);
    EXPECT_EQ(L.X_eval.cols(), d_in);
    EXPECT_TRUE(L.W.allFinite() && L.X_calib.allFinite() && L.X_eval.allFinite());
  }
  EXPECT_EQ(suite.unit_tokens, 8);
  EXPECT_EQ(suite.population_names, (std::vector<std::string>{"majority", "minority"}));
  ASSERT_EQ(suite.unit_ids.size(), 10u);
  EXPECT_EQ(suite.unit_ids[0], "u0000");
  EXPECT_EQ(suite.unit_ids[9], "u0009");
  // round(0.8 * 10) = 8 majority units first, then 2 minority.
  for (int u = 0; u < 10; ++u) EXPECT_EQ(suite.unit_population[u], u < 8 ? "majority" : "minority");
  // Copies of one layer spec are different layers.
  EXPECT_FALSE(bitwise_equal(suite.layers[0].W, suite.layers[1].W));
  EXPECT_FALSE(bitwise_equal(suite.layers[0].X_eval, suite.layers[1].X_eval));
}

TEST(SyntheticGeneration, UnitAssignmentCounts) {
  SyntheticSpec s;  // 128 units, shares 0.8 / 0.2
  std::vector<int> pop = synthetic_unit_populations(s);
  ASSERT_EQ(pop.size(), 128u);
  EXPECT_EQ(std::count(pop.begin(), pop.end(), 0), 102);  // round(102.4)
  EXPECT_EQ(std::count(pop.begin(), pop.end(), 1), 26);
  EXPECT_TRUE(std::is_sorted(pop.begin(), pop.end()));  // populations are contiguous

  s.populations = {population("a", 0.3), population("b", 0.3), population("c", 0.3),
                   population("d", 0.1)};
  s.eval_units = 15;
  pop = synthetic_unit_populations(s);
  ASSERT_EQ(pop.size(), 15u);
  std::vector<long> counts(4);
  for (int p : pop) ++counts[p];
  // Cumulative rounding: 4.5 -> 5, 9 -> 9, 13.5 -> 14, rest 1; never more than eval_units.
  EXPECT_EQ(counts, (std::vector<long>{5, 4, 5, 1}));
}

TEST(SyntheticGeneration, DeterministicForSeed) {
  SyntheticSpec s = small_spec();
  SyntheticSuite a = generate_suite(s, 42), b = generate_suite(s, 42), c = generate_suite(s, 43);
  EXPECT_TRUE(suites_equal(a, b));
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_FALSE(bitwise_equal(a.layers[l].W, c.layers[l].W));
    EXPECT_FALSE(bitwise_equal(a.layers[l].X_calib, c.layers[l].X_calib));
    EXPECT_FALSE(bitwise_equal(a.layers[l].X_eval, c.layers[l].X_eval));
  }
  // Streams are keyed by layer name: adding a layer leaves the others' data unchanged.
  SyntheticSpec more = s;
  more.layers.insert(more.layers.begin(), SyntheticLayerSpec{"extra", 32, 32, 1});
  SyntheticSuite m = generate_suite(more, 42);
  ASSERT_EQ(m.layers[3].name, "down");
  EXPECT_TRUE(bitwise_equal(m.layers[3].W, a.layers[2].W));
  EXPECT_TRUE(bitwise_equal(m.layers[3].X_eval, a.layers[2].X_eval));
}

TEST(SyntheticGeneration, BitwiseIdenticalAcrossThreadCounts) {
  // Rows above the 256-row chunk so the GEMM is split over chunks and threads, and a width
  // large enough that OpenBLAS would thread a standalone call. (A plain multi-threaded
  // OpenBLAS sgemm of these shapes differs in ~1-5% of elements between 1 and 2 threads,
  // which is why generation multiplies fixed chunks inside its own OpenMP loop.)
  SyntheticSpec s;
  s.layers = {{"wide", 384, 200, 1}, {"narrow", 48, 96, 1}};
  s.calib_tokens = 1000;
  s.eval_units = 24;
  s.unit_tokens = 40;
  s.populations[1].shift = 0.3;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  SyntheticSuite one = generate_suite(s, 5);
  omp_set_num_threads(2);
  SyntheticSuite two = generate_suite(s, 5);
  omp_set_num_threads(saved);
  EXPECT_TRUE(suites_equal(one, two));
}

TEST(SyntheticGeneration, OutlierChannelsCarryTheirMagnitude) {
  SyntheticSpec s;
  s.layers = {{"l", 128, 8, 1}};
  s.populations = {population("only", 1.0)};
  s.outlier_channels = 4;
  s.outlier_magnitude = 10;
  s.calib_tokens = 4096;
  s.eval_units = 2;
  s.unit_tokens = 4;
  const uint64_t seed = 11;
  SyntheticSuite suite = generate_suite(s, seed);
  const Matrix& X = suite.layers[0].X_calib;
  const std::vector<Index> order = synthetic_outlier_order(seed, "l", 128);
  VectorD amax = channel_absmax(X, 0, X.rows());
  std::vector<double> out, rest;
  for (Index k = 0; k < 128; ++k) (k < 4 ? out : rest).push_back(amax(order[k]));
  const double rest_mean = std::accumulate(rest.begin(), rest.end(), 0.0) / rest.size();
  const double out_mean = std::accumulate(out.begin(), out.end(), 0.0) / out.size();
  // The outlier channels are the largest, by about the magnitude on average (channel scales
  // themselves vary with the random mixing rows).
  EXPECT_GT(*std::min_element(out.begin(), out.end()),
            *std::max_element(rest.begin(), rest.end()));
  EXPECT_GT(out_mean / rest_mean, 10.0 / 2.0);
  EXPECT_LT(out_mean / rest_mean, 10.0 * 2.0);
  // Without outliers the same channels look like the rest.
  s.outlier_channels = 0;
  VectorD plain = channel_absmax(generate_suite(s, seed).layers[0].X_calib, 0, X.rows());
  for (Index k = 0; k < 4; ++k)
    EXPECT_NEAR(amax(order[k]) / plain(order[k]), 10.0, 1e-3);
}

TEST(SyntheticGeneration, MinorityHasOutliersCalibrationRarelySaw) {
  SyntheticSpec s;  // default populations: majority 4 outliers x10, minority 8 x25, decay 0.4
  s.layers = {{"l", 128, 8, 1}};
  s.calib_tokens = 2048;
  s.eval_units = 100;
  s.unit_tokens = 32;
  const uint64_t seed = 3;
  const std::vector<Index> order = synthetic_outlier_order(seed, "l", 128);
  // Ratio of the extra outlier channels' absmax (order[4..8)) to the median ordinary channel.
  auto extra_ratio = [&](const Matrix& X, Index r0, Index n) {
    VectorD a = channel_absmax(X, r0, n);
    std::vector<double> rest;
    for (Index k = 8; k < 128; ++k) rest.push_back(a(order[k]));
    std::nth_element(rest.begin(), rest.begin() + rest.size() / 2, rest.end());
    double extra = 0;
    for (Index k = 4; k < 8; ++k) extra += a(order[k]) / 4.0;
    return extra / rest[rest.size() / 2];
  };
  {
    s.calib_populations = {"majority"};
    SyntheticSuite suite = generate_suite(s, seed);
    const Matrix& Xe = suite.layers[0].X_eval;
    const Index T = suite.unit_tokens;
    const Index n_major = std::count(suite.unit_population.begin(), suite.unit_population.end(),
                                     std::string("majority"));
    EXPECT_EQ(n_major, 80);
    const double minority = extra_ratio(Xe, n_major * T, (100 - n_major) * T);
    const double majority = extra_ratio(Xe, 0, n_major * T);
    const double calib = extra_ratio(suite.layers[0].X_calib, 0, 2048);
    EXPECT_GT(minority, 5.0 * calib) << minority << " vs " << calib;
    EXPECT_GT(minority, 5.0 * majority);
    // The majority's own outliers are present in calibration.
    VectorD ac = channel_absmax(suite.layers[0].X_calib, 0, 2048);
    for (Index k = 0; k < 4; ++k) EXPECT_GT(ac(order[k]), 3.0 * ac(order[100]));
  }
  {
    // Calibration drawn from the minority only: its rows carry the extra outliers.
    s.calib_populations = {"minority"};
    SyntheticSuite suite = generate_suite(s, seed);
    const Matrix& Xe = suite.layers[0].X_eval;
    const double calib = extra_ratio(suite.layers[0].X_calib, 0, 2048);
    const double minority = extra_ratio(Xe, 80 * 32, 20 * 32);
    EXPECT_NEAR(calib / minority, 1.0, 0.5);
  }
}

TEST(SyntheticGeneration, CalibrationSplitAndShift) {
  // Give each population a distinct mean shift so rows reveal their population.
  SyntheticSpec s;
  s.layers = {{"l", 64, 8, 1}};
  s.outlier_channels = 0;
  s.populations = {population("a", 0.5, 2.0), population("b", 0.25, -2.0),
                   population("c", 0.25)};
  s.calib_populations = {"c", "a"};  // renormalised: c 1/3, a 2/3, in this order
  s.calib_tokens = 900;
  s.eval_units = 8;
  s.unit_tokens = 64;
  SyntheticSuite suite = generate_suite(s, 9);
  const Matrix& Xc = suite.layers[0].X_calib;
  const Matrix& Xe = suite.layers[0].X_eval;
  // The shift direction is the mean of population a's evaluation rows (norm 2*sqrt(64) = 16).
  VectorD va = Xe.topRows(4 * 64).cast<double>().colwise().mean().transpose();
  EXPECT_NEAR(va.norm(), 16.0, 1.0);
  VectorD vb = Xe.middleRows(4 * 64, 2 * 64).cast<double>().colwise().mean().transpose();
  EXPECT_NEAR(vb.dot(va) / (va.norm() * vb.norm()), -1.0, 0.02);
  VectorD vc = Xe.bottomRows(2 * 64).cast<double>().colwise().mean().transpose();
  EXPECT_LT(vc.norm(), 2.0);
  const VectorD u = va.normalized();
  // Calibration rows 0..299 are c (no shift), 300..899 are a (shift +16 along u).
  for (Index r = 0; r < 900; r += 37) {
    double proj = Xc.row(r).cast<double>().dot(u);
    if (r < 300)
      EXPECT_LT(std::fabs(proj), 6.0) << r;
    else
      EXPECT_GT(proj, 10.0) << r;
  }
}

TEST(SyntheticGeneration, SpectrumFollowsPowerLaw) {
  // Eigenvalues of XᵀX/n for x = U D z: the decay makes the leading eigenvalues fall off far
  // faster than for the same mixing without decay, and much faster than white noise.
  const Index d = 64, n = 16384;
  auto eigenvalues = [&](double decay) {
    SyntheticSpec s;
    s.layers = {{"l", static_cast<int>(d), 8, 1}};
    s.outlier_channels = 0;
    s.input_decay = decay;
    s.populations = {population("only", 1.0)};
    s.calib_tokens = static_cast<int>(n);
    s.eval_units = 2;
    s.unit_tokens = 1;
    MatrixD X = generate_suite(s, 21).layers[0].X_calib.cast<double>();
    MatrixD C = X.transpose() * X / static_cast<double>(n);
    Eigen::SelfAdjointEigenSolver<MatrixD> es(C);
    VectorD ev = es.eigenvalues().reverse();  // descending
    return ev;
  };
  VectorD decayed = eigenvalues(0.7), flat = eigenvalues(0.0);
  const Index k = d / 4;
  const double r_decayed = decayed(0) / decayed(k), r_flat = flat(0) / flat(k);
  // The ratio of eigenvalue 0 to eigenvalue k tracks (1+k)^(2*decay) = 17^1.4 ~ 53; the
  // random mixing alone gives a Marchenko-Pastur ratio of a few.
  EXPECT_GT(r_decayed, 20.0) << r_decayed;
  EXPECT_GT(r_decayed, 5.0 * r_flat) << r_decayed << " vs " << r_flat;
  // Log-log slope of the leading eigenvalues (ranks 1..d/4) near -2*decay = -1.4.
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  int m = 0;
  for (Index j = 1; j <= k; ++j, ++m) {
    double x = std::log(1.0 + j), y = std::log(decayed(j));
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  const double slope = (m * sxy - sx * sy) / (m * sxx - sx * sx);
  EXPECT_NEAR(slope, -1.4, 0.25) << slope;
  // White noise (the control of ALGORITHMS.md §2.6) has a nearly flat spectrum.
  MatrixD Z(n, d);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < d; ++j) Z(i, j) = CounterRng(1, 2).normal(i * d + j);
  Eigen::SelfAdjointEigenSolver<MatrixD> white(Z.transpose() * Z / static_cast<double>(n));
  EXPECT_LT(white.eigenvalues().maxCoeff() / white.eigenvalues().minCoeff(), 2.0);
  EXPECT_GT(decayed(0) / decayed(d - 1), 100.0);
}

TEST(SyntheticGeneration, StudentWeightsAreHeavyTailed) {
  SyntheticSpec s;
  s.layers = {{"w", 256, 256, 1}};
  s.calib_tokens = 8;
  s.eval_units = 2;
  s.unit_tokens = 1;
  s.populations = {population("only", 1.0)};
  s.weight_dist = WeightDist::Gaussian;
  Matrix Wg = generate_suite(s, 13).layers[0].W;
  s.weight_dist = WeightDist::StudentT;
  s.weight_df = 5;
  Matrix Wt = generate_suite(s, 13).layers[0].W;
  const double target_std = 1.0 / 16.0;
  auto std_of = [](const Matrix& W) {
    double ss = W.cast<double>().squaredNorm() / static_cast<double>(W.size());
    return std::sqrt(ss);
  };
  EXPECT_NEAR(std_of(Wg), target_std, 0.02 * target_std);
  EXPECT_NEAR(std_of(Wt), target_std, 0.06 * target_std);
  const double kg = excess_kurtosis(Wg), kt = excess_kurtosis(Wt);
  EXPECT_NEAR(kg, 0.0, 0.15);
  // t_5 has excess kurtosis 6; the sample value is noisy but far from Gaussian.
  EXPECT_GT(kt, 2.0) << kt;
  EXPECT_GT(kt, kg + 2.0);
}

}  // namespace
}  // namespace ql
