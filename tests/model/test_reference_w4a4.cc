// W4A4 and KV4 rows against ../shared/data/austen-llama-7m/golden/flatquant.json (an independent
// PyTorch port of the FlatQuant repository's quantizers; settings written out in the file):
// per-channel symmetric RTN weights (scale = max|w|/7, codes in [-8, 7]), per-token symmetric
// A4 at the input of all seven linears, and K/V 4-bit asymmetric per token and KV head after
// RoPE. Degradations (Persuasion perplexity increase over FP) within 15% of the reference's
// (or 0.05), as the other reference tests. Also the KV-cache scope end to end on the shared
// model: an exact cache is the FP model bit for bit, and error grows as bits fall.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "tests/model/reference_util.h"

namespace ql {
namespace {

constexpr const char* kRtnW4A4 =
    "{algorithm: rtn, bits: 4, scheme: sym, granularity: channel, scale_dtype: fp32, "
    "act: {bits: 4, scheme: sym, granularity: token}}";

double reference_row(const nlohmann::json& ref, const std::string& name) {
  for (const auto& r : ref["results"])
    if (r["name"] == name) return r["ppl_persuasion"].get<double>();
  ADD_FAILURE() << "flatquant.json has no row " << name;
  return NAN;
}

TEST(ReferenceW4A4, RtnSmoothQuantAndKv4RowsMatchTheReference) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  const nlohmann::json ref = load("flatquant.json");
  const double fp = reference_row(ref, "fp");
  WorkloadCache cache;
  const std::string rtn = kRtnW4A4;
  const std::map<std::string, std::string> rows = {
      {"rtn_w4a4", "[" + rtn + "]"},
      {"rtn_w4a4kv4", "[" + rtn + ", {algorithm: kv_rtn, k_bits: 4, v_bits: 4}]"},
      {"rtn_w4a4kv4_kvrowgroup", "[" + rtn + ", {algorithm: kv_rtn, k_bits: 4, v_bits: 4, channel_group: 128}]"},
      {"smoothquant_w4a4", "[{algorithm: smoothquant, alpha: 0.5}, " + rtn + "]"}};
  for (const auto& [name, quant] : rows) {
    // SmoothQuant's maxima come from the FP model's calibration inputs (propagate: fp), as the
    // reference measures them; the other rows use no calibration data (2 windows suffice).
    const bool calibrated = name.rfind("smoothquant", 0) == 0;
    const double ours = persuasion_ppl(", propagate: fp", quant, cache, calibrated ? 128 : 2);
    expect_degradation_matches(name, ours, reference_row(ref, name), fp);
  }
}

/// Mean and sample standard deviation.
std::pair<double, double> mean_sd(const std::vector<double>& v) {
  double m = 0, ss = 0;
  for (double x : v) m += x;
  m /= static_cast<double>(v.size());
  for (double x : v) ss += (x - m) * (x - m);
  return {m, v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0};
}

// The rotation row depends on the random draw: ours over 5 seeds against the reference's 3
// seeds (its own numpy draws), means within 15% of the reference's mean increase. KV4 rotation
// rows (3 more seeds each side) run with QL_REFERENCE_ALL=1.
TEST(ReferenceW4A4, RotationRowsMatchTheReferenceOverSeeds) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  const nlohmann::json ref = load("flatquant.json");
  const double fp = reference_row(ref, "fp");
  WorkloadCache cache;
  const bool all = std::getenv("QL_REFERENCE_ALL") != nullptr;
  for (const std::string row : {"rotation_w4a4", "rotation_w4a4kv4"}) {
    const bool kv = row.find("kv4") != std::string::npos;
    if (kv && !all) continue;
    std::vector<double> ours, theirs;
    for (const char* suffix : {"", "_seed1", "_seed2"}) theirs.push_back(reference_row(ref, row + suffix) - fp);
    for (int seed = 0; seed < 5; ++seed) {
      const std::string quant = "[{algorithm: rotation, seed: " + std::to_string(seed) + "}, " + std::string(kRtnW4A4) +
                                (kv ? ", {algorithm: kv_rtn, k_bits: 4, v_bits: 4}]" : "]");
      ours.push_back(persuasion_ppl("", quant, cache, 2) - fp);
    }
    const auto [mo, so] = mean_sd(ours);
    const auto [mr, sr] = mean_sd(theirs);
    std::printf("[reference] %-22s ours +%.4f sd %.4f (5 seeds)  reference +%.4f sd %.4f (3 seeds)\n", row.c_str(), mo,
                so, mr, sr);
    EXPECT_NEAR(mo, mr, std::max(0.15 * mr, 0.05)) << row;
  }
}

/// Summary metrics of one run on 16 windows of Persuasion (KL against the FP model).
std::map<std::string, double> kv_run(const std::string& quant, WorkloadCache& cache) {
  const std::string d = kData.string();
  const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                           "calib: {text: " + d + "/text/austen_train.txt, n_samples: 2, seq_len: 64}\n" +
                           "eval: {seq_len: 256, streams: [{name: p, path: " + d +
                           "/text/persuasion.txt, max_windows: 16}]}\nslices: {n_boot: 0}\nquant: " + quant + "\n";
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "kv.yaml"), "kv", "kv.yaml", default_registry());
  RunRecord r = execute_run(rc, cache, default_registry());
  EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
  std::map<std::string, double> m;
  for (auto& s : r.summary) m[s.metric] = s.value;
  return m;
}

TEST(KvCacheScope, ExactCachesAreTheFpModelAndErrorGrowsAsBitsFall) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  WorkloadCache cache;
  const auto fp = kv_run("[{algorithm: fp}]", cache);
  // 16 bits keeps the cache exact; a residual window as long as the evaluation window leaves
  // every token exact: both are the FP model, bit for bit.
  for (const char* q : {"[{algorithm: kv_rtn, k_bits: 16, v_bits: 16}]",
                        "[{algorithm: kv_rtn, k_bits: 2, v_bits: 2, residual_length: 256}]"}) {
    const auto r = kv_run(q, cache);
    EXPECT_EQ(r.at("p/ppl"), fp.at("p/ppl")) << q;
    EXPECT_EQ(r.at("p/kl_mean"), 0.0) << q;
  }
  EXPECT_EQ(fp.at("kv_bits"), 16.0);
  double last_kl = 0, last_bits = 16;
  for (int bits : {8, 4, 2}) {
    const auto r = kv_run("[{algorithm: kv_rtn, k_bits: " + std::to_string(bits) + ", v_bits: " +
                              std::to_string(bits) + "}]",
                          cache);
    // One fp16 scale and zero per head of 32 values: bits + 1 per element.
    EXPECT_DOUBLE_EQ(r.at("kv_bits"), bits + 1.0);
    EXPECT_GT(r.at("p/kl_mean"), 2 * last_kl) << bits << " bits";
    EXPECT_LT(r.at("kv_bits"), last_bits);
    last_kl = r.at("p/kl_mean");
    last_bits = r.at("kv_bits");
  }
  // KIVI's layout at 2 bits (per-channel keys, 32 exact recent tokens) beats per-token 2 bits.
  const auto kivi = kv_run("[{algorithm: kv_rtn, k_bits: 2, v_bits: 2, keys: channel, residual_length: 32}]", cache);
  EXPECT_LT(kivi.at("p/kl_mean"), 0.5 * last_kl);
  // Weight and KV steps compose.
  const auto both = kv_run("[{algorithm: rtn, bits: 4}, {algorithm: kv_rtn}]", cache);
  EXPECT_LT(both.at("bpw"), 16.0);
  EXPECT_DOUBLE_EQ(both.at("kv_bits"), 5.0);
}

}  // namespace
}  // namespace ql
