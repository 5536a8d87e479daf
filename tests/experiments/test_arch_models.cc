// RTN and GPTQ end to end, from a config, on the tiny checkpoints of the newer model families
// (../shared/data/arch: llama3-tiny with llama3 RoPE scaling, qwen3-tiny with per-head q/k
// norms and head_dim != hidden/heads, qwen2-tiny with q/k/v biases): calibration, quantization
// and evaluation through the runner, on token ids (the golden sequences of each directory, so
// no tokenizer is involved). Each run must succeed; 8-bit RTN must stay far closer to FP than
// 3-bit RTN (KL below 5% of it: the quantized forward is the model's forward), and GPTQ at 3 bits
// must not be far worse than RTN (random weights and 8 windows of calibration give GPTQ little
// to gain, so no improvement is required).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "experiments/runner.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

namespace fs = std::filesystem;
const fs::path kArch = fs::path(QL_SHARED_DATA_DIR) / "arch";

/// The golden sequences' ids of `model`, one document per line, in a fresh directory.
std::string ids_file(const std::string& model) {
  const std::string d = testutil::fresh_dir("arch_" + model);
  std::ifstream gin(kArch / model / "golden" / "golden.json");
  const nlohmann::json g = nlohmann::json::parse(gin);
  std::ofstream out(d + "/ids.txt");
  for (const auto& seq : g["sequences"]) {
    const std::vector<int> ids = seq["ids"].get<std::vector<int>>();
    for (std::size_t i = 0; i < ids.size(); ++i) out << (i ? " " : "") << ids[i];
    out << "\n";
  }
  return d + "/ids.txt";
}

double metric(const RunRecord& r, const std::string& name) {
  for (auto& s : r.summary)
    if (s.metric == name) return s.value;
  ADD_FAILURE() << "no metric " << name;
  return NAN;
}

/// One run of `quant` (a YAML flow list body) on `model` with the ids file for calibration and
/// evaluation.
RunRecord run_on(const std::string& model, const std::string& ids, const std::string& quant, WorkloadCache& cache) {
  const std::string yaml = "workload: {kind: model, path: " + (kArch / model).string() + "}\ncalib: {ids: " + ids +
                           ", n_samples: 8, seq_len: 32, rule: strided}\neval: {seq_len: 32, token_ids: [{name: g, "
                           "path: " + ids + "}]}\nslices: {n_boot: 0}\nquant: [" + quant + "]\n";
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, model + ".yaml"), model, model + ".yaml", default_registry());
  return execute_run(rc, cache, default_registry());
}

void run_family(const std::string& model) {
  if (!fs::exists(kArch / model / "golden" / "golden.json")) GTEST_SKIP() << "needs " << kArch / model;
  const std::string ids = ids_file(model);
  WorkloadCache cache;
  auto run = [&](const std::string& quant) {
    RunRecord r = run_on(model, ids, quant, cache);
    EXPECT_EQ(r.status, RunStatus::Ok) << model << " " << quant << ": " << r.message;
    return r;
  };
  const RunRecord rtn8 = run("{algorithm: rtn, bits: 8, granularity: channel}");
  const RunRecord rtn3 = run("{algorithm: rtn, bits: 3, granularity: channel}");
  const RunRecord gptq3 = run("{algorithm: gptq, bits: 3, granularity: channel}");
  const double k8 = metric(rtn8, "g/kl_mean"), k3 = metric(rtn3, "g/kl_mean"), kg = metric(gptq3, "g/kl_mean");
  std::printf("[%s] KL to FP: rtn w8 %.3g, rtn w3 %.3g, gptq w3 %.3g\n", model.c_str(), k8, k3, kg);
  EXPECT_GT(k8, 0.0);
  EXPECT_LT(k8, 0.05 * k3);
  EXPECT_GT(kg, 0.0);
  EXPECT_LT(kg, 2.0 * k3) << "GPTQ should not be far worse than RTN";
  EXPECT_TRUE(std::isfinite(metric(gptq3, "g/ppl")));
}

// Qwen3's per-head q/k norms and the plugins that read placement: the ones that act on linear
// inputs (SmoothQuant, rotation, AWQ) or on post-RoPE keys (kv_rtn) run; the ones that train
// through the block graph, which does not model the head norms, refuse with that reason
// (FlatQuant, VLMQ, first-order ZeroQAT); SPSA ZeroQAT only runs forwards and works.
TEST(ArchModels, Qwen3PlacementPluginsRunOrRefuseWithAReason) {
  const std::string model = "qwen3-tiny";
  if (!fs::exists(kArch / model / "golden" / "golden.json")) GTEST_SKIP() << "needs " << kArch / model;
  const std::string ids = ids_file(model);
  WorkloadCache cache;
  auto run = [&](const std::string& quant) { return run_on(model, ids, quant, cache); };
  const std::string w4a8 = "{algorithm: rtn, bits: 4, scheme: sym, granularity: channel, act: {bits: 8, scheme: sym, granularity: token}}";
  for (const std::string& ok : {"{algorithm: smoothquant, alpha: 0.5}, " + w4a8, "{algorithm: rotation, seed: 0}, " + w4a8,
                                std::string("{algorithm: awq, bits: 4, granularity: group, group_size: 32}"),
                                std::string("{algorithm: kv_rtn, k_bits: 4, v_bits: 4}"),
                                std::string("{algorithm: rtn, bits: 3, granularity: channel}, {algorithm: zeroqat, steps: 2, "
                                            "batch: 2, heldout: 1}")}) {
    const RunRecord r = run(ok);
    EXPECT_EQ(r.status, RunStatus::Ok) << ok << ": " << r.message;
  }
  for (const std::string& refused : {"{algorithm: flatquant, seed: 0, epochs: 1}, " + w4a8,
                                     std::string("{algorithm: vlmq, bits: 4, granularity: channel}"),
                                     std::string("{algorithm: rtn, bits: 3, granularity: channel}, {algorithm: zeroqat, "
                                                 "estimator: first_order, steps: 2, batch: 2, heldout: 1}")}) {
    const RunRecord r = run(refused);
    EXPECT_EQ(r.status, RunStatus::Failed) << refused;
    EXPECT_NE(r.message.find("per-head q/k norms (Qwen3)"), std::string::npos) << refused << ": " << r.message;
  }
}

TEST(ArchModels, Llama3TinyRtnAndGptq) { run_family("llama3-tiny"); }
TEST(ArchModels, Qwen3TinyRtnAndGptq) { run_family("qwen3-tiny"); }
TEST(ArchModels, Qwen2TinyRtnAndGptq) { run_family("qwen2-tiny"); }

}  // namespace
}  // namespace ql
