// GPTQ and SmoothQuant against the reference implementations' perplexities in
// ../shared/data/austen-llama-7m/golden/gptq_smoothquant.json (IST-DASLab/gptq's algorithm and
// a reference SmoothQuant/W8A8 fake quantization, both run in PyTorch), with the settings
// written out in that file. The model is small and robust, so degradations (increase of
// Persuasion perplexity over FP) are compared: SmoothQuant / naive W8A8 rows one setting at a
// time, within 15% of the reference's increase (or 0.05); GPTQ's rows, whose value moves by
// 10-30% with the rounding path, as means over calibration draws (below), and GPTQ's mean
// increase must stay below RTN's.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <vector>
#include <nlohmann/json.hpp>

#include "core/metrics.h"
#include "experiments/runner.h"
#include "tests/model/reference_util.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

/// The gptq step of a reference row (gptq_smoothquant.json "results": bits, group, act-order,
/// static groups; the file's gptq_settings otherwise).
std::string gptq_step(const nlohmann::json& r) {
  const int bits = r["bits"].get<int>(), group = r["group"].get<int>();
  return "[{algorithm: gptq, bits: " + std::to_string(bits) +
         ", scheme: asym, scale_dtype: fp32, percdamp: 0.01, blocksize: 128" +
         (r["actorder"].get<bool>() ? ", act_order: true" : "") +
         (r["static_groups"].get<bool>() ? ", static_groups: true" : "") +
         (group < 0 ? ", granularity: channel}]"
                    : ", granularity: group, group_size: " + std::to_string(group) + "}]");
}

// GPTQ's rows are compared as distributions over calibration draws, never as one draw. Its
// column-by-column error feedback turns last-bit differences (another BLAS kernel, another
// damping value, another float implementation) into other rounding decisions, and on this
// small model that moves a row's increase by 10-30%: on one AVX-512 machine W3 per channel is
// +1.22 under OpenBLAS's default kernels and +1.01 under its Haswell kernels; the reference's
// own draw 0 is +1.14 there and +1.05 on a Haswell machine. One draw at 15% passes or fails by
// which machine runs it.
//
// So each row runs over the reference's calibration draws (draw k of 5: the strided windows
// shifted by k * (stride // 5); calib.draw / calib.draws) and compares the mean increase with
// the reference's mean over the same draws (the file's "draws" block):
//   |mean_ours - mean_ref| <= kRelTol · |mean_ref| + kZ · sqrt(se_ours² + se_ref²),
// se = sd / sqrt(draws). kRelTol allows a systematic implementation difference (our Hessian
// accumulation and summation order are not the reference's); the second term is the sampling
// noise of both means. CI runs the first kCiDraws draws of every row, against the reference's
// mean over the same draws; QL_REFERENCE_ALL=1 runs all five.
constexpr double kRelTol = 0.10;
constexpr double kZ = 3.0;
constexpr int kCiDraws = 3;

TEST(Reference, GptqRowsOverCalibrationDrawsMatchTheReferenceAndBeatRtn) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  const nlohmann::json g = load("golden.json"), ref = load("gptq_smoothquant.json");
  ASSERT_TRUE(ref.contains("draws")) << "gptq_smoothquant.json has no 'draws' block";
  const nlohmann::json& draws = ref["draws"];
  const double fp_ref = draws["fp_ppl_persuasion"].get<double>();
  const double fp = g["stream_ppl"]["persuasion"]["ppl"].get<double>();
  const bool all = std::getenv("QL_REFERENCE_ALL") != nullptr;
  WorkloadCache cache;
  int rows = 0;
  for (const auto& r : ref["results"]) {
    const std::string name = r["name"].get<std::string>();
    if (r["method"] != "gptq" || !draws["rows"].contains(name)) continue;
    ++rows;
    const nlohmann::json& d = draws["rows"][name];
    const int file_draws = d["n_draws"].get<int>();
    const int K = all ? file_draws : std::min(kCiDraws, file_draws);
    std::vector<double> ours, theirs;
    std::string per_draw;
    for (int k = 0; k < K; ++k) {
      const double ppl = persuasion_ppl(", draws: " + std::to_string(file_draws) +
                                            ", draw: " + std::to_string(k),
                                        gptq_step(r), cache);
      ours.push_back(ppl - fp);
      theirs.push_back(d["ppl_persuasion_per_draw"][k].get<double>() - fp_ref);
      char buf[32];
      std::snprintf(buf, sizeof buf, "%s%+.4f", k ? ", " : "", ours.back());
      per_draw += buf;
    }
    const MeanSd o = mean_sd(ours), t = mean_sd(theirs);
    const double tol = kRelTol * std::fabs(t.mean) + kZ * std::sqrt(o.se * o.se + t.se * t.se);
    EXPECT_NEAR(o.mean, t.mean, tol) << name << " over " << K << " draws: ours " << o.mean << " ± "
                                     << o.sd << " (" << per_draw << "), reference " << t.mean
                                     << " ± " << t.sd;
    std::printf("[reference-draws] %-28s %d draws  ours %+.4f ± %.4f (%s)  reference %+.4f ± %.4f  "
                "|diff| %.4f  tol %.4f\n",
                name.c_str(), K, o.mean, o.sd, per_draw.c_str(), t.mean, t.sd,
                std::fabs(o.mean - t.mean), tol);
    const std::string rtn_key =
        "w" + std::to_string(r["bits"].get<int>()) + "_g" + std::to_string(r["group"].get<int>());
    if (g["rtn_ppl"].contains(rtn_key)) {
      const double rtn = g["rtn_ppl"][rtn_key]["ppl"].get<double>() - fp;
      EXPECT_LT(o.mean, rtn) << name << ": GPTQ's mean increase must stay below RTN's (" << rtn << ")";
    }
  }
  EXPECT_EQ(rows, 6) << "GPTQ rows missing from the draws block of gptq_smoothquant.json";
}

TEST(Reference, SmoothQuantAndNaiveW8A8RowsMatchTheReference) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  const nlohmann::json g = load("golden.json"), ref = load("gptq_smoothquant.json");
  const double fp = g["stream_ppl"]["persuasion"]["ppl"].get<double>();
  // One row per (bits, activation granularity) of the file's 27, the method alternating
  // between naive, alpha 0.5 and alpha 0.85, so each bit level, granularity and method is
  // covered (all 27 take 7.5 min; run with QL_REFERENCE_ALL=1, measured within 3.1%).
  const std::set<std::string> chosen = {
      "smoothquant_a0.5_w8a8_per_token",  "naive_w8a8_per_tensor_dynamic",
      "smoothquant_a0.85_w8a8_per_tensor_static", "naive_w6a6_per_token",
      "smoothquant_a0.85_w6a6_per_tensor_dynamic", "smoothquant_a0.5_w6a6_per_tensor_static",
      "smoothquant_a0.5_w4a8_per_token",  "naive_w4a8_per_tensor_dynamic",
      "smoothquant_a0.85_w4a8_per_tensor_static"};
  const bool all = std::getenv("QL_REFERENCE_ALL") != nullptr;
  WorkloadCache cache;
  int ran = 0;
  for (const auto& r : ref["results"]) {
    if (r["method"] == "gptq") continue;
    const std::string name = r["name"].get<std::string>();
    if (!all && !chosen.count(name)) continue;
    ++ran;
    const std::string act = r["act"].get<std::string>();
    const std::string gran = act == "per_token" ? "token" : "tensor";
    const std::string mode = act == "per_tensor_static" ? "static" : "dynamic";
    std::string rtn = "{algorithm: rtn, bits: " + std::to_string(r["wbits"].get<int>()) +
                      ", scheme: sym, granularity: channel, scale_dtype: fp32, act: {bits: " +
                      std::to_string(r["abits"].get<int>()) + ", scheme: sym, granularity: " + gran +
                      ", mode: " + mode + "}}";
    std::string quant = r["method"] == "naive"
                            ? "[" + rtn + "]"
                            : "[{algorithm: smoothquant, alpha: " + std::to_string(r["alpha"].get<double>()) +
                                  "}, " + rtn + "]";
    const double ours = persuasion_ppl(", propagate: fp", quant, cache);
    expect_degradation_matches(name, ours, r["ppl_persuasion"].get<double>(), fp);
  }
  EXPECT_EQ(ran, all ? 27 : static_cast<int>(chosen.size())) << "rows missing from gptq_smoothquant.json";
}

}  // namespace
}  // namespace ql

#include "core/model/checkpoint.h"
#include "core/model/text_data.h"
#include "core/model/tokenizer.h"
#include "core/model/transformer.h"

namespace ql {
namespace {

// O3 (per-tensor static) activation ranges are the calibration inputs' min/max and are used
// unchanged at evaluation: they do not depend on the evaluation text, and they equal the
// extremes of each linear's input over the calibration windows of the FP model.
TEST(Reference, StaticActivationRangesComeFromCalibrationOnly) {
  if (!have_data()) GTEST_SKIP() << "../shared/data not found at " << kData;
  const std::string d = kData.string();
  WorkloadCache cache;  // shared: the calibration text is tokenized once
  auto ranges = [&](const std::string& eval_text) {
    const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                             "calib: {text: " + d + "/text/persuasion.txt, n_samples: 4, seq_len: 128, rule: strided, propagate: fp}\n" +
                             "eval: {seq_len: 128, kl: false, streams: [{name: p, path: " + eval_text + ", max_windows: 4}]}\n" +
                             "slices: {n_boot: 0}\n" +
                             "quant: [{algorithm: rtn, bits: 8, scheme: sym, act: {bits: 8, granularity: tensor, mode: static}}]\n";
    RunRecord r = execute_run(parse_run_config(ConfigNode::parse(yaml, "o3.yaml"), "o3", "o3.yaml", default_registry()),
                              cache, default_registry());
    EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
    std::map<std::string, double> out;
    for (auto& g : r.diagnostics)
      if (g.algorithm == "act") out[g.layer + "/" + g.name] = g.value;
    return out;
  };
  const auto a = ranges(d + "/text/austen_train.txt");
  const auto b = ranges(d + "/text/wikitext2_test.txt");
  ASSERT_EQ(a.size(), 6u * 7u * 2u);
  EXPECT_EQ(a, b) << "static ranges must not depend on the evaluation text";

  // Independent recomputation for block 0's q_proj and down_proj inputs.
  ModelWeights w = load_checkpoint(d + "/austen-llama-7m");
  Tokenizer tok = Tokenizer::load(d + "/austen-llama-7m");
  auto windows = calibration_windows(stream_ids(d + "/text/persuasion.txt", tok), 4, 128, CalibRule::Strided, 0);
  Transformer model(w);
  float qlo = INFINITY, qhi = -INFINITY, dlo = INFINITY, dhi = -INFINITY;
  ForwardHooks hooks;
  hooks.capture_input = [&](int b, LinearKind k, const Matrix& X) {
    if (b != 0) return;
    if (k == LinearKind::Q) qlo = std::min(qlo, X.minCoeff()), qhi = std::max(qhi, X.maxCoeff());
    if (k == LinearKind::Down) dlo = std::min(dlo, X.minCoeff()), dhi = std::max(dhi, X.maxCoeff());
  };
  for (auto& win : windows) model.block(0, model.embed(win), 0, &hooks);
  EXPECT_EQ(a.at("model.layers.0.self_attn.q_proj/static_range_lo"), qlo);
  EXPECT_EQ(a.at("model.layers.0.self_attn.q_proj/static_range_hi"), qhi);
  EXPECT_EQ(a.at("model.layers.0.mlp.down_proj/static_range_lo"), dlo);
  EXPECT_EQ(a.at("model.layers.0.mlp.down_proj/static_range_hi"), dhi);
}

}  // namespace
}  // namespace ql
