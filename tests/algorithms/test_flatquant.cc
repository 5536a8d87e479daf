// FlatQuant (algorithms/flatquant) on standalone layers (ALGORITHMS.md §5.6): under W4A4 on
// inputs with outlier channels the learned transform beats the random orthogonal one, which
// beats the SmoothQuant diagonal, which beats no transform; training lowers its own loss; the
// result does not depend on the thread count; the grids it cannot simulate and model workloads
// (block training not built yet) are refused with errors that say so.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>

#include "algorithms/algorithm.h"
#include "algorithms/flatquant/trainer.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "experiments/runner.h"

namespace ql {
namespace {

RunRecord run_yaml(const std::string& yaml, WorkloadCache& cache, RunStatus expect = RunStatus::Ok) {
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "fq.yaml"), "fq", "fq.yaml", default_registry());
  RunRecord r = execute_run(rc, cache, default_registry());
  EXPECT_EQ(r.status, expect) << r.message;
  return r;
}

double summary(const RunRecord& r, const std::string& metric) {
  for (auto& s : r.summary)
    if (s.metric == metric) return s.value;
  ADD_FAILURE() << "no summary metric " << metric;
  return NAN;
}

/// ALGORITHMS.md §5.6's layer: d = 256 = 16 x 16, 3 outlier channels, heavy-tailed weights.
std::string layer_suite(int magnitude) {
  return R"(seed: 0
workload:
  kind: synthetic
  layers: [{name: attn.qkv, d_in: 256, d_out: 256}]
  weight_dist: student_t
  input_decay: 0.3
  outlier_channels: 3
  outlier_magnitude: )" +
         std::to_string(magnitude) + R"(
  populations: [{name: all, share: 1.0}]
calib: {tokens: 1024}
eval: {units: 32, unit_tokens: 32}
slices: {n_boot: 0}
)";
}
const std::string kBase = layer_suite(10);
const std::string kW4A4 = "bits: 4, scheme: sym, granularity: channel, scale_dtype: fp32, "
                          "act: {bits: 4, scheme: sym, granularity: token}";

// The §5.6 order (learned < orthogonal < diagonal < identity) at moderate outliers (10x), over
// three seeds of each random draw; at 60x the diagonal overtakes the random rotation (whose
// error does not shrink with the outliers' share of the energy) and the learned transform still
// beats both (README, "FlatQuant on the synthetic suite").
TEST(FlatQuant, LearnedBeatsOrthogonalAndDiagonalUnderW4A4) {
  WorkloadCache cache;
  for (int magnitude : {10, 60}) {
    auto err = [&](const std::string& steps) {
      return summary(run_yaml(layer_suite(magnitude) + "quant: [" + steps + "{algorithm: rtn, " + kW4A4 + "}]\n", cache),
                     "out_rel_err");
    };
    const double identity = err("");
    const double diagonal = err("{algorithm: smoothquant, alpha: 0.5}, ");
    double rot_best = 1e9, rot_worst = 0, fq_worst = 0;
    for (int seed : {0, 1, 2}) {
      const double rot = err("{algorithm: rotation, seed: " + std::to_string(seed) + "}, ");
      rot_best = std::min(rot_best, rot);
      rot_worst = std::max(rot_worst, rot);
      fq_worst = std::max(fq_worst, err("{algorithm: flatquant, epochs: 5, seed: " + std::to_string(seed) + "}, "));
    }
    std::printf("[ measured ] %dx W4A4 out_rel_err: identity %.4f, diagonal %.4f, rotation %.4f-%.4f, flatquant <= %.4f\n",
                magnitude, identity, diagonal, rot_best, rot_worst, fq_worst);
    EXPECT_LT(fq_worst, std::min(rot_best, diagonal)) << magnitude;
    EXPECT_LT(std::max(rot_worst, diagonal), identity) << magnitude;
    if (magnitude == 10) EXPECT_LT(rot_worst, diagonal);
    else EXPECT_LT(diagonal, rot_best);
  }
}

TEST(FlatQuant, TrainingLowersItsLossAndRecordsDiagnostics) {
  WorkloadCache cache;
  const RunRecord r = run_yaml(kBase + "quant: [{algorithm: flatquant, epochs: 4}, {algorithm: rtn, " + kW4A4 + "}]\n", cache);
  double first = NAN, last = NAN, steps = NAN, clip = NAN;
  for (auto& d : r.diagnostics) {
    if (d.name == "loss_first_epoch") first = d.value;
    if (d.name == "loss_last_epoch") last = d.value;
    if (d.name == "steps") steps = d.value;
    if (d.name == "act_clip_hi") clip = d.value;
  }
  EXPECT_LT(last, first);
  EXPECT_EQ(steps, 4 * 8);  // 1024 tokens in batches of 128
  EXPECT_LT(clip, 1.0);     // the learned activation clipping is in use
  bool recorded = false;
  for (auto& p : r.params)
    if (p.key == "attn.qkv.transform.input") recorded = p.value.find("diag · kronecker 16x16 (x) 16x16") != std::string::npos;
  EXPECT_TRUE(recorded) << "the learned transform is recorded with its structure";
}

TEST(FlatQuant, LayerTrainingIsBitwiseIndependentOfTheThreadCount) {
  const CounterRng rng(3, 0);
  Matrix X(512, 64), W(48, 64);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(rng.normal(static_cast<uint64_t>(i)) * (i % 64 < 2 ? 20 : 1));
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(0.1 * rng.normal(static_cast<uint64_t>(i + X.size())));
  QuantSpec w4;
  w4.bits = 4;
  w4.scheme = QuantScheme::Sym;
  ActQuantSpec a4;
  a4.bits = 4;
  FlatTrainOptions o;
  o.epochs = 2;
  auto train = [&](int threads) {
    ThreadCountGuard g(threads);
    return train_flat_layer(X, W, &w4, &a4, 128, o);
  };
  const FlatLayerResult a = train(1), b = train(2);
  EXPECT_EQ(std::memcmp(a.weight.data(), b.weight.data(), sizeof(float) * a.weight.size()), 0);
  EXPECT_EQ(a.transform->matrix(), b.transform->matrix());
  EXPECT_EQ(a.act_clip.hi, b.act_clip.hi);
}

TEST(FlatQuant, RefusesGridsItCannotSimulateAndModelWorkloads) {
  WorkloadCache cache;
  const RunRecord g = run_yaml(kBase + "quant: [{algorithm: flatquant, epochs: 1}, {algorithm: rtn, bits: 4, "
                                       "granularity: group, group_size: 32}]\n",
                               cache, RunStatus::Failed);
  EXPECT_NE(g.message.find("per-channel weight grids"), std::string::npos) << g.message;
  const std::string model = "workload: {kind: model, path: /nonexistent}\ncalib: {text: c.txt}\n"
                            "eval: {seq_len: 16, streams: [{name: p, path: c.txt}]}\n"
                            "quant: [{algorithm: flatquant}, {algorithm: rtn, bits: 4}]\n";
  try {
    parse_run_config(ConfigNode::parse(model, "m.yaml"), "m", "m.yaml", default_registry());
    ADD_FAILURE() << "a model workload was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("not built yet"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("quant.0.algorithm"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ql
