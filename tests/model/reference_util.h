// Helpers shared by the reference tests (../shared/data/austen-llama-7m/golden/*.json): the
// data location, a reference file, and a run's Persuasion perplexity under the reference
// protocol (128 strided calibration windows of 256 tokens, 256-token evaluation windows).
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <nlohmann/json.hpp>

#include "experiments/runner.h"

namespace ql {
namespace {

namespace fs = std::filesystem;

const fs::path kData = QL_SHARED_DATA_DIR;

bool have_data() { return fs::exists(kData / "austen-llama-7m" / "golden" / "gptq_smoothquant.json"); }

nlohmann::json load(const char* name) {
  std::ifstream in(kData / "austen-llama-7m" / "golden" / name);
  return nlohmann::json::parse(in);
}

/// Persuasion perplexity of the quantized model alone (eval.kl: false), calibrated on
/// n_samples (the references: 128) strided windows of the training text.
double persuasion_ppl(const std::string& calib_extra, const std::string& quant, WorkloadCache& cache,
                      int n_samples = 128) {
  const std::string d = kData.string();
  const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                           "calib: {text: " + d + "/text/austen_train.txt, n_samples: " + std::to_string(n_samples) +
                           ", seq_len: 256, rule: strided" +
                           calib_extra + "}\n" + "eval: {seq_len: 256, kl: false, streams: [{name: p, path: " + d +
                           "/text/persuasion.txt}]}\n" + "slices: {n_boot: 0}\n" + "quant: " + quant + "\n";
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "reference.yaml"), "reference", "reference.yaml",
                                  default_registry());
  RunRecord r = execute_run(rc, cache, default_registry());
  EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
  for (auto& s : r.summary)
    if (s.metric == "p/ppl") return s.value;
  ADD_FAILURE() << "no p/ppl in the summary";
  return NAN;
}

[[maybe_unused]] void expect_degradation_matches(const std::string& name, double ours, double reference, double fp) {
  const double d_ours = ours - fp, d_ref = reference - fp;
  const double tol = std::max(0.15 * std::fabs(d_ref), 0.05);
  EXPECT_NEAR(d_ours, d_ref, tol) << name << ": ours " << ours << " (+" << d_ours << "), reference "
                                  << reference << " (+" << d_ref << ")";
  std::printf("[reference] %-45s ours %.4f (+%.4f)  reference %.4f (+%.4f)\n", name.c_str(), ours, d_ours,
              reference, d_ref);
}

}  // namespace
}  // namespace ql
