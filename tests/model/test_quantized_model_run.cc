// The quantized-model object a model run builds: after calibration it holds, for every linear
// whose weights lie on a grid, the codes and grids that reproduce them exactly, and none where
// a later step moved the weights off the grid.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <string>

#include "core/model/quantized_model.h"
#include "experiments/model_runner.h"
#include "experiments/runner.h"

namespace ql {
namespace {

namespace fs = std::filesystem;
const fs::path kData = QL_SHARED_DATA_DIR;

/// Runs `quant` on the shared model (4 calibration windows of Persuasion, one evaluation window) and calls
/// check with the quantized model after calibration.
void with_quantized_model(const std::string& quant, const std::function<void(const QuantizedModel&)>& check) {
  const std::string d = kData.string();
  const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                           "calib: {text: " + d + "/text/persuasion.txt, n_samples: 4, seq_len: 128}\n" +
                           "eval: {seq_len: 128, streams: [{name: p, path: " + d +
                           "/text/persuasion.txt, max_windows: 1}]}\nslices: {n_boot: 0}\nquant: " + quant + "\n";
  const RunConfig rc =
      parse_run_config(ConfigNode::parse(yaml, "codes.yaml"), "codes", "codes.yaml", default_registry());
  static ModelCache cache;  // the checkpoint and texts, loaded once for every case
  RunRecord rec;
  bool called = false;
  execute_model_run(rc, cache, default_registry(), rec, {}, [&](const QuantizedModel& m) {
    called = true;
    check(m);
  });
  EXPECT_TRUE(called);
}

/// Every linear of every block: codes present iff `expect(kind)`, and then they reproduce the
/// current weights bitwise.
void expect_codes(const QuantizedModel& m, const std::function<bool(LinearKind)>& expect, int bits) {
  for (int b = 0; b < m.num_blocks(); ++b)
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      const auto& c = m.codes(b, kind);
      const std::string name = linear_name(b, kind);
      ASSERT_EQ(c.has_value(), expect(kind)) << name;
      if (!c) continue;
      EXPECT_EQ(c->spec.bits, bits) << name;
      const Matrix& W = m.block(b).linear(kind).W;
      const Matrix deq = dequantize(*c);
      ASSERT_EQ(deq.rows(), W.rows());
      ASSERT_EQ(deq.cols(), W.cols());
      EXPECT_EQ(std::memcmp(deq.data(), W.data(), sizeof(float) * W.size()), 0) << name;
    }
}

class QuantizedModelRun : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kData / "austen-llama-7m" / "config.json"))
      GTEST_SKIP() << "../shared/data not found at " << QL_SHARED_DATA_DIR;
  }
};

TEST_F(QuantizedModelRun, LayerStepsLeaveCodesThatReproduceTheWeights) {
  auto all = [](LinearKind) { return true; };
  with_quantized_model("[{algorithm: rtn, bits: 4, granularity: group, group_size: 32}]",
                       [&](const QuantizedModel& m) { expect_codes(m, all, 4); });
  // act-order with per-group grids: codes carry the column -> group map (g_idx).
  with_quantized_model("[{algorithm: gptq, bits: 3, granularity: group, group_size: 64, act_order: true}]",
                       [&](const QuantizedModel& m) {
                         expect_codes(m, all, 3);
                         EXPECT_FALSE(m.codes(0, LinearKind::Q)->g_idx.empty());
                       });
  // Transforms and smoothing come first: the codes are of the weights in that space.
  with_quantized_model("[{algorithm: rotation}, {algorithm: rtn, bits: 4}]",
                       [&](const QuantizedModel& m) { expect_codes(m, all, 4); });
  with_quantized_model("[{algorithm: smoothquant}, {algorithm: rtn, bits: 8, act: {bits: 8}}]",
                       [&](const QuantizedModel& m) { expect_codes(m, all, 8); });
}

TEST_F(QuantizedModelRun, WeightsMovedOffTheGridHoldNoCodes) {
  with_quantized_model("[{algorithm: fp}]", [](const QuantizedModel& m) {
    expect_codes(m, [](LinearKind) { return false; }, 0);
  });
  // Smoothing after quantization folds s into the consumers of the RMSNorm outputs (q/k/v,
  // gate/up): off their grids. o_proj and down_proj have no norm to absorb s and keep theirs.
  with_quantized_model("[{algorithm: rtn, bits: 4}, {algorithm: smoothquant}]", [](const QuantizedModel& m) {
    expect_codes(m, [](LinearKind k) { return k == LinearKind::O || k == LinearKind::Down; }, 4);
  });
}

}  // namespace
}  // namespace ql
