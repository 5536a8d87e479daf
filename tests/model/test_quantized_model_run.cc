// The quantized-model object a model run builds: after calibration it holds, for every linear
// whose weights lie on a grid, the codes and grids that reproduce them exactly, and none where
// a later step moved the weights off the grid.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>

#include "core/error.h"
#include "core/model/checkpoint.h"
#include "core/model/quantized_model.h"
#include "core/model/transformer.h"
#include "core/quantize.h"
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

// ---- model scope: the runner drives a model-scope step after every block-sequential one ----

struct NoOptions {};

/// A model-scope step for these tests: re-quantizes q_proj of block 0 to 2 bits per channel
/// (RTN), and sets its codes; with `stale`, changes the weights but leaves the old codes,
/// which ModelAlgorithm::run must refuse.
class RequantizeQ0 final : public ModelAlgorithm {
 public:
  explicit RequantizeQ0(bool stale) : stale_(stale) {}

 private:
  void process_model(ModelInput& in, ModelResult& out) const override {
    QuantSpec spec;
    spec.bits = 2;
    spec.granularity = Granularity::PerChannel;
    Matrix& W = in.model->block(0).q.W;
    QuantizedTensor q = quantize(W, spec);
    W = dequantize(q);
    if (!stale_) in.model->codes(0, LinearKind::Q) = std::move(q);
    out.diagnostics.emplace_back("windows", static_cast<double>(in.windows->size()));
  }
  bool stale_;
};

/// A block-scope step for these tests that declares needs.block_io and keeps what it was
/// given (per block: inputs and targets), installing no transform.
std::map<int, std::pair<std::vector<Matrix>, std::vector<Matrix>>>& seen_block_io() {
  static std::map<int, std::pair<std::vector<Matrix>, std::vector<Matrix>>> seen;
  return seen;
}
class RecordBlockIo final : public BlockAlgorithm {
  BlockTransforms compute_transforms(const BlockInput& in, Diagnostics&) const override {
    if (in.inputs) seen_block_io()[in.block] = {*in.inputs, *in.targets};
    return {};
  }
};

const AlgorithmRegistry& model_scope_registry() {
  static const AlgorithmRegistry reg = [] {
    AlgorithmRegistry r;
    register_all(r);
    AlgorithmInfo io;
    io.name = "record_block_io";
    io.scope = Scope::Block;
    io.summary = "test: records the block inputs and FP targets it is given";
    io.uses_weight_spec = false;
    io.needs.block_io = true;
    io.options = std::make_shared<OptionSchema<NoOptions>>();
    io.make = [](const std::any&) { return std::make_unique<RecordBlockIo>(); };
    r.add(std::move(io));
    for (bool stale : {false, true}) {
      AlgorithmInfo info;
      info.name = stale ? "requantize_q0_stale" : "requantize_q0";
      info.scope = Scope::Model;
      info.summary = "test: q_proj of block 0 to 2 bits";
      info.uses_weight_spec = false;
      info.options = std::make_shared<OptionSchema<NoOptions>>();
      info.make = [stale](const std::any&) { return std::make_unique<RequantizeQ0>(stale); };
      r.add(std::move(info));
    }
    return r;
  }();
  return reg;
}

RunRecord run_with(const std::string& quant, const std::function<void(const QuantizedModel&)>& check = {}) {
  const std::string d = kData.string();
  const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\n" +
                           "calib: {text: " + d + "/text/persuasion.txt, n_samples: 4, seq_len: 128}\n" +
                           "eval: {seq_len: 128, streams: [{name: p, path: " + d +
                           "/text/persuasion.txt, max_windows: 4}]}\nslices: {n_boot: 0}\nquant: " + quant + "\n";
  const RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "model_scope.yaml"), "ms", "model_scope.yaml",
                                        model_scope_registry());
  static ModelCache cache;
  RunRecord rec;
  execute_model_run(rc, cache, model_scope_registry(), rec, {}, check);
  return rec;
}

double summary_of(const RunRecord& r, const std::string& metric) {
  for (auto& s : r.summary)
    if (s.metric == metric) return s.value;
  ADD_FAILURE() << "no summary metric " << metric;
  return NAN;
}

TEST_F(QuantizedModelRun, AModelStepRunsAfterEveryBlockAndItsChangesAreEvaluatedAndRecorded) {
  const RunRecord base = run_with("[{algorithm: rtn, bits: 4}]");
  const RunRecord with = run_with("[{algorithm: rtn, bits: 4}, {algorithm: requantize_q0}]", [](const QuantizedModel& m) {
    ASSERT_TRUE(m.codes(0, LinearKind::Q).has_value());
    EXPECT_EQ(m.codes(0, LinearKind::Q)->spec.bits, 2);
    EXPECT_EQ(m.codes(1, LinearKind::Q)->spec.bits, 4);
  });
  // Evaluated: 2-bit q_proj in block 0 costs perplexity.
  EXPECT_GT(summary_of(with, "p/ppl"), summary_of(base, "p/ppl"));
  // The row of the changed linear is re-measured (2 bits, larger error, no Hessian error);
  // every other row is as before.
  ASSERT_EQ(with.layers.size(), base.layers.size());
  for (std::size_t i = 0; i < with.layers.size(); ++i) {
    if (i == 0) {
      EXPECT_EQ(with.layers[i].layer, "model.layers.0.self_attn.q_proj");
      EXPECT_EQ(with.layers[i].bits, 2);
      EXPECT_GT(with.layers[i].weight_mse, base.layers[i].weight_mse);
      EXPECT_TRUE(std::isnan(with.layers[i].rel_err_h));
    } else {
      EXPECT_EQ(with.layers[i].weight_mse, base.layers[i].weight_mse) << with.layers[i].layer;
      EXPECT_EQ(with.layers[i].rel_err_h, base.layers[i].rel_err_h) << with.layers[i].layer;
    }
  }
  bool seen = false;
  for (auto& d : with.diagnostics)
    if (d.layer == "model" && d.algorithm == "requantize_q0" && d.name == "windows") seen = d.value == 4.0;
  EXPECT_TRUE(seen);
}

TEST_F(QuantizedModelRun, AModelStepThatLeavesStaleCodesIsRefusedByName) {
  try {
    run_with("[{algorithm: rtn, bits: 4}, {algorithm: requantize_q0_stale}]");
    FAIL() << "expected a NumericError";
  } catch (const NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj"), std::string::npos) << e.what();
  }
}

TEST(ModelScope, BlockSequentialStepsAfterAModelStepFailAtTheirLine) {
  const std::string yaml =
      "workload: {kind: model, path: /m}\ncalib: {text: /t.txt}\neval: {streams: [{name: p, path: /p.txt}]}\n"
      "quant:\n  - {algorithm: requantize_q0}\n  - {algorithm: rtn, bits: 4}\n";
  try {
    parse_run_config(ConfigNode::parse(yaml, "ms.yaml"), "ms", "ms.yaml", model_scope_registry());
    FAIL() << "expected a ConfigError";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("ms.yaml:6"), std::string::npos) << msg;
    EXPECT_NE(msg.find("quant.1.algorithm"), std::string::npos) << msg;
    EXPECT_NE(msg.find("model-scope step 'requantize_q0'"), std::string::npos) << msg;
  }
  // A synthetic workload has no model to hand over.
  const std::string syn = "workload: {kind: synthetic, layers: [{name: l, d_in: 8, d_out: 8}]}\n"
                          "quant: [{algorithm: requantize_q0}]\n";
  EXPECT_THROW(parse_run_config(ConfigNode::parse(syn, "s.yaml"), "s", "s.yaml", model_scope_registry()), ConfigError);
}

TEST_F(QuantizedModelRun, ABlockStepThatNeedsBlockIoGetsTheBlockInputsAndTheFpOutputsOnThem) {
  seen_block_io().clear();
  run_with("[{algorithm: record_block_io}, {algorithm: rtn, bits: 3}]");  // throws on failure
  ASSERT_EQ(seen_block_io().size(), 6u);
  const ModelWeights fp = load_checkpoint((kData / "austen-llama-7m").string());
  const Transformer model(fp);
  for (int b : {0, 1, 5}) {
    const auto& [inputs, targets] = seen_block_io().at(b);
    ASSERT_EQ(inputs.size(), 4u);  // the calibration windows
    for (std::size_t w = 0; w < inputs.size(); ++w) {
      // Targets: the FP block on exactly these inputs, bitwise.
      const Matrix y = model.block(b, inputs[w]);
      EXPECT_EQ(std::memcmp(y.data(), targets[w].data(), sizeof(float) * y.size()), 0) << b << " " << w;
    }
  }
  // Block 1's inputs come from the quantized block 0 (calib.propagate: quantized): not the FP
  // block 0's outputs on its inputs.
  const auto& b0 = seen_block_io().at(0);
  const auto& b1 = seen_block_io().at(1);
  EXPECT_NE(std::memcmp(b0.second[0].data(), b1.first[0].data(), sizeof(float) * b0.second[0].size()), 0);
}

}  // namespace
}  // namespace ql
