// Calibration mixtures (calib.sources): n_samples windows split over named sources by their
// shares (largest remainder, a pure function of shares and n), interleaved so every stretch
// of windows holds the proportions, deterministic per seed, reported per source; and the
// config errors that point at the key.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "core/model/text_data.h"
#include "experiments/runner.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

TEST(CalibMixture, CountsFollowTheSharesByLargestRemainder) {
  EXPECT_EQ(mixture_counts({0.9, 0.1}, 128), (std::vector<int>{115, 13}));  // 115.2, 12.8
  EXPECT_EQ(mixture_counts({9, 1}, 128), (std::vector<int>{115, 13}));      // normalised
  EXPECT_EQ(mixture_counts({1, 1, 1}, 4), (std::vector<int>{2, 1, 1}));     // ties: earlier source
  EXPECT_EQ(mixture_counts({0.5, 0.25, 0.25}, 8), (std::vector<int>{4, 2, 2}));
  for (int n : {1, 7, 128, 1000}) {
    const std::vector<int> c = mixture_counts({0.7, 0.2, 0.1}, n);
    EXPECT_EQ(c[0] + c[1] + c[2], n);
  }
  EXPECT_THROW(mixture_counts({0.5, 0.0}, 8), ShapeError);
  EXPECT_THROW(mixture_counts({}, 8), ShapeError);
}

TEST(CalibMixture, OrderInterleavesTheSourcesInProportion) {
  const std::vector<int> counts = {115, 13};
  const std::vector<int> order = mixture_order(counts);
  ASSERT_EQ(order.size(), 128u);
  int minority = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    minority += order[i] == 1;
    // After any prefix of i + 1 windows the minority's count is within one of its share.
    EXPECT_LE(std::abs(minority - 13.0 * static_cast<double>(i + 1) / 128.0), 1.0) << i;
  }
  EXPECT_EQ(minority, 13);
  EXPECT_EQ(mixture_order({2, 0, 1}), (std::vector<int>{0, 2, 0}));
}

/// A tiny checkpoint and two token-id sources of different content.
const std::string& tiny_dir() {
  static const std::string dir = [] {
    const std::string d = testutil::fresh_dir("calib_mixture");
    const auto cfg = testutil::tiny_config();
    testutil::write_checkpoint(d, cfg, testutil::tiny_model_tensors(cfg));
    for (const char* name : {"a", "b"}) {
      std::ofstream ids(d + "/" + name + ".txt");
      for (int w = 0; w < 8; ++w) {
        for (int t = 0; t < 40; ++t) ids << (t ? " " : "") << (name[0] == 'a' ? (5 * w + 3 * t + 1) % 8 : 8 + (w + t) % 8);
        ids << "\n";
      }
    }
    return d;
  }();
  return dir;
}

std::string mixture_yaml(int seed, const std::string& shares = "0.75, 0.25", const std::string& extra = "") {
  const std::string d = tiny_dir();
  const auto comma = shares.find(',');
  return "workload: {kind: model, path: " + d + "}\ncalib: {n_samples: 8, seq_len: 16, seed: " + std::to_string(seed) +
         extra + ", sources: [{name: a, ids: " + d + "/a.txt, share: " + shares.substr(0, comma) + "}, {name: b, ids: " +
         d + "/b.txt, share:" + shares.substr(comma + 1) + "}]}\neval: {seq_len: 16, token_ids: [{name: t, path: " + d +
         "/a.txt}]}\nslices: {n_boot: 0}\nquant: [{algorithm: gptq, bits: 3, granularity: channel}]\n";
}

RunRecord run(const std::string& yaml, WorkloadCache& cache) {
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "mix.yaml"), "mix", "mix.yaml", default_registry());
  return execute_run(rc, cache, default_registry());
}

std::string param(const RunRecord& r, const std::string& key) {
  for (auto& p : r.params)
    if (p.key == key) return p.value;
  return "";
}

double metric(const RunRecord& r, const std::string& name) {
  for (auto& s : r.summary)
    if (s.metric == name) return s.value;
  return NAN;
}

TEST(CalibMixture, RunsReportTheirSourcesAndAreDeterministicPerSeed) {
  WorkloadCache cache, other;
  const RunRecord a = run(mixture_yaml(0), cache), b = run(mixture_yaml(0), other), c = run(mixture_yaml(1), cache);
  for (const RunRecord* r : {&a, &b, &c}) ASSERT_EQ(r->status, RunStatus::Ok) << r->message;
  EXPECT_EQ(param(a, "calib.source.a.windows"), "6");
  EXPECT_EQ(param(a, "calib.source.b.windows"), "2");
  EXPECT_EQ(metric(a, "t/ppl"), metric(b, "t/ppl")) << "same seed, same windows";
  EXPECT_NE(metric(a, "t/ppl"), metric(c, "t/ppl")) << "another seed draws other random windows";
  // The other proportions calibrate on other data.
  const RunRecord d = run(mixture_yaml(0, "0.25, 0.75"), cache);
  ASSERT_EQ(d.status, RunStatus::Ok) << d.message;
  EXPECT_EQ(param(d, "calib.source.b.windows"), "6");
  EXPECT_NE(metric(a, "t/ppl"), metric(d, "t/ppl"));
}

TEST(CalibMixture, ConfigErrorsPointAtTheKey) {
  auto error_of = [](const std::string& yaml) -> std::string {
    try {
      parse_run_config(ConfigNode::parse(yaml, "mix.yaml"), "mix", "mix.yaml", default_registry());
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  };
  const std::string neg = error_of(mixture_yaml(0, "0.75, -1"));
  EXPECT_NE(neg.find("calib.sources.1.share"), std::string::npos) << neg;
  const std::string both = error_of(mixture_yaml(0, "0.75, 0.25", ", text: x.txt"));
  EXPECT_NE(both.find("exactly one of"), std::string::npos) << both;
  const std::string few = error_of(mixture_yaml(0).replace(mixture_yaml(0).find("n_samples: 8"), 12, "n_samples: 1"));
  EXPECT_NE(few.find("calib.n_samples"), std::string::npos) << few;
}

}  // namespace
}  // namespace ql
