// VLMQ (algorithms/vlmq): weights of 1 give GPTQ bitwise (through the Hessian and end to end
// on a model), the normalisation ignores a common scale, VLMQ's weighted objective is not above
// GPTQ's on a tiny layer, the importance comes from the method's own gradient and lowers the
// minority population's error on the §8.6 synthetic suite (loss: relative), and the model path
// reports its importance diagnostics.
#include <gtest/gtest.h>

#include <fstream>
#include <iostream>
#include <random>

#include "algorithms/algorithm.h"
#include "algorithms/gptq/gptq.h"
#include "algorithms/vlmq/vlmq.h"
#include "core/calib_stats.h"
#include "core/config_node.h"
#include "core/metrics.h"
#include "experiments/config.h"
#include "experiments/runner.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

Matrix gaussian(Index rows, Index cols, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  Matrix M(rows, cols);
  for (Index i = 0; i < M.size(); ++i) M.data()[i] = nd(rng) * scale;
  return M;
}

TEST(Vlmq, UnitWeightsGiveTheUnweightedHessianAndGptqBitwise) {
  const Matrix X = gaussian(300, 48, 1);
  HessianAccumulator a(48), b(48);
  a.add(X);
  b.add_weighted(X, Vector::Ones(300));
  EXPECT_EQ(a.upper_triangle(), b.upper_triangle());
  // The plugin's layer step is gptq_solve on the Hessian it is given: same H, same weights.
  const std::string yaml = "quant: [{algorithm: vlmq, bits: 3, granularity: group, group_size: 16}, "
                           "{algorithm: gptq, bits: 3, granularity: group, group_size: 16}]\n";
  const RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "v.yaml"), "v", "v.yaml", default_registry());
  const Matrix W = gaussian(20, 48, 2, 0.1f);
  LayerResult r[2];
  for (int i = 0; i < 2; ++i) {
    auto algo = default_registry().get(rc.quant[i].algorithm).create(rc.quant[i].options);
    LayerInput in{"l", &W, i ? &a : &b, nullptr, rc.quant[i].weight, 0};
    r[i] = dynamic_cast<const LayerAlgorithm&>(*algo).run(in);
  }
  EXPECT_EQ(r[0].output.W, r[1].output.W);
}

TEST(Vlmq, NormalisationIgnoresACommonScaleAndClipsAtThePercentile) {
  std::vector<Vector> g = {gaussian(1, 100, 3).row(0).cwiseAbs().transpose(),
                           gaussian(1, 60, 4).row(0).cwiseAbs().transpose()};
  const std::vector<Vector> n1 = normalise_importance(g, 100);
  std::vector<Vector> g4 = g, g3 = g;
  for (auto& v : g4) v *= 4.0f;
  for (auto& v : g3) v *= 3.0f;
  const std::vector<Vector> n4 = normalise_importance(g4, 100), n3 = normalise_importance(g3, 100);
  double sum = 0;
  for (std::size_t w = 0; w < 2; ++w) {
    EXPECT_EQ(n1[w], n4[w]) << "a power of two scales exactly";
    EXPECT_LT((n1[w] - n3[w]).cwiseAbs().maxCoeff(), 1e-6f);
    sum += n1[w].cast<double>().sum();
  }
  EXPECT_NEAR(sum / 160.0, 1.0, 1e-6) << "mean 1";
  // Clipping at the 90th percentile: at most 10% of the tokens keep a larger raw value, and
  // after normalisation they all share the maximum.
  const std::vector<Vector> c = normalise_importance(g, 90);
  const float top = std::max(c[0].maxCoeff(), c[1].maxCoeff());
  int at_top = 0;
  for (auto& v : c) at_top += (v.array() == top).count();
  EXPECT_GE(at_top, 16);
  EXPECT_THROW(normalise_importance({Vector::Zero(5)}, 100), NumericError);
}

TEST(Vlmq, WeightedObjectiveIsNotAboveGptqsOnATinyLayer) {
  // Two populations: 90% low-rank and loud, 10% diverse; per-token weights favouring the
  // diverse tokens. GPTQ on H̃ targets tr(ΔW H̃ ΔWᵀ); GPTQ on H does not.
  GptqOptions opt;
  opt.compare_rtn = false;
  QuantSpec spec;
  spec.bits = 3;
  spec.granularity = Granularity::PerGroup;
  spec.group_size = 16;
  for (uint64_t seed : {1, 2, 3, 4, 5}) {
    const Index d = 64, n = 1000, nv = 900;
    Matrix X(n, d);
    X.topRows(nv) = gaussian(nv, 3, seed) * gaussian(3, d, seed + 10) * 3.0f;
    X.bottomRows(n - nv) = gaussian(n - nv, d, seed + 20);
    Vector g = Vector::Ones(n);
    g.tail(n - nv).setConstant(9.0f);
    HessianAccumulator H(d), Ht(d);
    H.add(X);
    Ht.add_weighted(X, g);
    const Matrix W = gaussian(24, d, seed + 30, 0.2f);
    const Matrix Wv = gptq_solve(W, Ht.upper_triangle(), spec, opt, "v").W;
    const Matrix Wg = gptq_solve(W, H.upper_triangle(), spec, opt, "g").W;
    const Matrix Hm = Ht.hessian();
    const double ev = output_error(Wv - W, Hm), eg = output_error(Wg - W, Hm);
    std::cout << "[ measured ] seed " << seed << ": weighted objective vlmq " << ev << " gptq " << eg << "\n";
    EXPECT_LE(ev, eg);
  }
}

/// The §8.6 suite at a small size: 90% "vision" tokens (a large shared direction and a steep
/// spectrum), 10% "text" tokens (flat spectrum).
std::string synthetic_yaml(int seed, const std::string& quant) {
  return "seed: " + std::to_string(seed) +
         "\nworkload:\n  kind: synthetic\n  layers: [{name: a, d_in: 128, d_out: 256}, {name: b, d_in: 256, d_out: 128}]\n"
         "  populations:\n    - {name: vision, share: 0.9, input_decay: 2.0, shift: 1.0}\n"
         "    - {name: text, share: 0.1, input_decay: 0.3}\n"
         "calib: {tokens: 4096}\neval: {units: 100, unit_tokens: 32}\nslices: {n_boot: 0}\nquant: [" +
         quant + "]\n";
}

double slice(const RunRecord& r, const std::string& metric, const std::string& value) {
  for (const SliceRow& s : r.slices)
    if (s.metric == metric && s.slice_value == value) return s.value;
  return NAN;
}

double diag_value(const RunRecord& r, const std::string& layer, const std::string& name) {
  for (auto& d : r.diagnostics)
    if (d.layer == layer && d.name == name) return d.value;
  return NAN;
}

TEST(VlmqSynthetic, OwnGradientImportanceLowersTheMinorityError) {
  WorkloadCache cache;
  auto run = [&](int seed, const std::string& q) {
    const RunConfig rc = parse_run_config(ConfigNode::parse(synthetic_yaml(seed, q), "s.yaml"), "s", "s.yaml",
                                          default_registry());
    RunRecord r = execute_run(rc, cache, default_registry());
    EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
    return r;
  };
  const std::string grid = "bits: 3, granularity: group, group_size: 64";
  double ratio_sum = 0;
  for (int seed : {0, 1, 2}) {
    const RunRecord g = run(seed, "{algorithm: gptq, " + grid + "}");
    const RunRecord v = run(seed, "{algorithm: vlmq, loss: relative, " + grid + "}");
    const RunRecord m = run(seed, "{algorithm: vlmq, " + grid + "}");
    const double gt = slice(g, "out_rel_err", "text"), vt = slice(v, "out_rel_err", "text");
    const double gv = slice(g, "out_rel_err", "vision"), vv = slice(v, "out_rel_err", "vision");
    std::cout << "[ measured ] seed " << seed << ": text gptq " << gt << " vlmq(relative) " << vt << " vlmq(mse) "
              << slice(m, "out_rel_err", "text") << "; vision gptq " << gv << " vlmq(relative) " << vv
              << "; text share of importance " << diag_value(v, "a", "importance_share.text") << "\n";
    // Measured 0.93-0.94 per seed (three seeds); every seed below GPTQ, the mean clearly so.
    EXPECT_LT(vt, gt) << "seed " << seed;
    ratio_sum += vt / gt;
    // The importance is computed, not read off the labels: the text share is neither its
    // token share (0.1) nor the balanced 0.5.
    const double share = diag_value(v, "a", "importance_share.text");
    EXPECT_GT(share, 0.12);
    EXPECT_NE(share, 0.5);
    EXPECT_LT(diag_value(v, "a", "effective_tokens"), 4096.0);
  }
  EXPECT_LT(ratio_sum / 3, 0.97);
}

TEST(VlmqModel, UnitImportanceIsGptqAndDiagnosticsAreReported) {
  const std::string d = testutil::fresh_dir("vlmq_model");
  const auto cfg = testutil::tiny_config();
  testutil::write_checkpoint(d, cfg, testutil::tiny_model_tensors(cfg));
  {
    std::ofstream ids(d + "/ids.txt");
    for (int w = 0; w < 8; ++w) {
      for (int t = 0; t < 40; ++t) ids << (t ? " " : "") << (5 * w + 3 * t + 1) % 16;
      ids << "\n";
    }
  }
  auto yaml = [&](const std::string& q) {
    return "workload: {kind: model, path: " + d + "}\ncalib: {n_samples: 8, seq_len: 16, ids: " + d +
           "/ids.txt}\neval: {seq_len: 16, token_ids: [{name: t, path: " + d + "/ids.txt}]}\nslices: {n_boot: 0}\n" +
           "quant: [" + q + "]\n";
  };
  WorkloadCache cache;
  auto run = [&](const std::string& q) {
    const RunConfig rc = parse_run_config(ConfigNode::parse(yaml(q), "m.yaml"), "m", "m.yaml", default_registry());
    RunRecord r = execute_run(rc, cache, default_registry());
    EXPECT_EQ(r.status, RunStatus::Ok) << r.message;
    return r;
  };
  const std::string grid = "bits: 3, granularity: channel";
  // One calibration source: `balance` gives every token weight 1 exactly, so the Hessians are
  // GPTQ's bit for bit and so is the model.
  const RunRecord g = run("{algorithm: gptq, " + grid + "}");
  const RunRecord b = run("{algorithm: vlmq, population: balance, " + grid + "}");
  const RunRecord v = run("{algorithm: vlmq, " + grid + "}");
  auto ppl = [](const RunRecord& r) -> double {
    for (auto& s : r.summary)
      if (s.metric == "t/ppl") return s.value;
    return NAN;
  };
  EXPECT_EQ(ppl(g), ppl(b));
  EXPECT_TRUE(std::isfinite(ppl(v)));
  ASSERT_EQ(g.layers.size(), b.layers.size());
  for (std::size_t i = 0; i < g.layers.size(); ++i) EXPECT_EQ(g.layers[i].weight_mse, b.layers[i].weight_mse);
  EXPECT_EQ(diag_value(b, "model.layers.0", "effective_tokens"), 128.0);  // 8 windows x 16 tokens, all weight 1
  EXPECT_EQ(diag_value(b, "model.layers.0.attn_in", "cond_ratio"), 1.0) << "weights of 1: H̃ = H";
  const double cond = diag_value(v, "model.layers.1.mlp_hidden", "cond_ratio");
  EXPECT_TRUE(std::isfinite(cond) && cond > 0 && cond != 1.0) << cond;
  const double eff = diag_value(v, "model.layers.1", "effective_tokens");
  EXPECT_GT(eff, 1.0);
  EXPECT_LT(eff, 128.0) << "gradient importance is not uniform";
  // The other site and norm give other importance (the site is really read).
  const RunRecord o = run("{algorithm: vlmq, site: output, norm: l1, clip_percentile: 100, " + grid + "}");
  EXPECT_NE(diag_value(o, "model.layers.1", "effective_tokens"), eff);
  EXPECT_TRUE(std::isfinite(ppl(o)));
}

}  // namespace
}  // namespace ql
