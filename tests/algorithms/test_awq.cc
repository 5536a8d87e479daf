// AWQ (algorithms/awq): the reference's scales, the clip search, α = 0 without clipping is RTN
// bitwise, the scale search never scores above RTN and helps where a few input channels carry
// large activations, the folded model (norms and up_proj rows) computes the FP function when a
// later step quantizes, and option errors point at the key.
#include <gtest/gtest.h>

#include <array>
#include <filesystem>
#include <iostream>
#include <random>

#include "algorithms/algorithm.h"
#include "algorithms/awq/awq.h"
#include "core/calib_stats.h"
#include "core/config_node.h"
#include "core/metrics.h"
#include "core/model/architecture.h"
#include "core/model/checkpoint.h"
#include "core/model/text_data.h"
#include "core/model/tokenizer.h"
#include "core/model/transformer.h"
#include "core/quantize.h"
#include "experiments/config.h"
#include "experiments/pipeline.h"

namespace fs = std::filesystem;

namespace ql {
namespace {

const fs::path kData = QL_SHARED_DATA_DIR;
const fs::path kModel = kData / "austen-llama-7m";

RunConfig parse(const std::string& quant) {
  const std::string yaml = "quant: " + quant + "\n";
  return parse_run_config(ConfigNode::parse(yaml, "awq.yaml"), "awq", "awq.yaml", default_registry());
}

std::string error_of(const std::string& quant) {
  try {
    parse(quant);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

/// Inputs with a few loud channels (x20), as LLM activations have: AWQ's premise.
Matrix outlier_inputs(Index n, Index d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  Matrix X(n, d);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < d; ++j) X(i, j) = nd(rng) * (j % 16 == 3 ? 20.0f : 1.0f);
  return X;
}

Matrix random_weights(Index rows, Index d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  Matrix W(rows, d);
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = nd(rng) * 0.05f;
  return W;
}

QuantSpec grid(int bits, int group) {
  QuantSpec s;
  s.bits = bits;
  s.granularity = Granularity::PerGroup;
  s.group_size = group;
  return s;
}

double diag(const ChannelScaleTransform& t, const std::string& key) {
  for (auto& [k, v] : t.diagnostics)
    if (k == key) return v;
  return NAN;
}

struct Layer {
  Matrix X;
  std::vector<Matrix> W;
  HessianAccumulator H;
  ChannelStats S;
};

Layer make_layer(uint64_t seed) {
  Layer l{outlier_inputs(512, 128, seed), {random_weights(48, 128, seed + 1), random_weights(32, 128, seed + 2)},
          HessianAccumulator(128), ChannelStats(128)};
  l.H.add(l.X);
  l.S.add(l.X);
  return l;
}

ChannelScaleTransform run_awq(const std::string& options, const Layer& l, const QuantSpec& spec, bool quantize = true) {
  const RunConfig rc = parse("[{algorithm: awq, bits: 3" + options + "}]");
  const auto algo = default_registry().get("awq").create(rc.quant.at(0).options);
  NormConsumerInput in;
  in.name = "x";
  in.consumer_names = {"x.gate_proj", "x.up_proj"};
  for (const Matrix& W : l.W) in.consumers.push_back(&W);
  in.input_stats = &l.S;
  in.hessian = &l.H;
  in.spec = &spec;
  in.quantize = quantize;
  return dynamic_cast<const NormConsumerAlgorithm&>(*algo).run(in);
}

TEST(Awq, ScalesFollowTheReference) {
  const VectorD m = (VectorD(4) << 0.5, 2.0, 8.0, 1e-9).finished();
  EXPECT_TRUE(awq_scales(m, 0.0).isOnes());
  const VectorD s = awq_scales(m, 0.5);
  // mean|x|^α, floored at 1e-4, over sqrt(max · min): here sqrt(8)·1e-4 -> normalised product 1.
  EXPECT_NEAR(s.maxCoeff() * s.minCoeff(), 1.0, 1e-6);
  EXPECT_NEAR(s[2] / s[1], 2.0, 1e-6);
  EXPECT_NEAR(s[3] / s[0], 1e-4 / std::sqrt(0.5), 1e-6) << "the 1e-4 floor";
  for (Index j = 0; j < 4; ++j) EXPECT_EQ(s[j], static_cast<double>(static_cast<float>(s[j]))) << "float scales";
  EXPECT_THROW(awq_scales(m, 1.5), NumericError);
}

TEST(Awq, AlphaZeroWithoutClippingIsRtnBitwise) {
  const Layer l = make_layer(7);
  const QuantSpec spec = grid(3, 32);
  const ChannelScaleTransform t = run_awq(", alpha: 0, clip: false", l, spec);
  EXPECT_TRUE(t.scales.isOnes());
  for (std::size_t i = 0; i < l.W.size(); ++i) {
    const QuantizedTensor q = quantize(l.W[i], spec);
    ASSERT_TRUE(t.quantized[i].has_value());
    EXPECT_EQ(t.weights[i], dequantize(q));
    EXPECT_EQ(t.quantized[i]->codes, q.codes);
  }
}

TEST(Awq, SearchNeverScoresAboveRtnAndHelpsOutlierChannels) {
  for (uint64_t seed : {1, 2, 3}) {
    const Layer l = make_layer(seed);
    const QuantSpec spec = grid(3, 32);
    const ChannelScaleTransform t = run_awq("", l, spec);
    EXPECT_LE(diag(t, "scale_error"), diag(t, "scale_error_rtn"));  // α = 0 is on the grid
    EXPECT_GT(diag(t, "alpha"), 0.0) << "loud channels should get a scale";
    EXPECT_LE(diag(t, "clip_error_after"), diag(t, "clip_error_before"));
    // The final weights (scaled, clipped, rounded) against RTN, through the same inputs:
    // x' = x / s reads W' = Q(...), so compare outputs X' W'ᵀ with X Wᵀ.
    const Vector inv = t.scales.cwiseInverse().cast<float>();
    const Matrix Xs = l.X * inv.asDiagonal();
    double awq = 0, rtn = 0;
    for (std::size_t i = 0; i < l.W.size(); ++i) {
      const Matrix Y = l.X * l.W[i].transpose();
      awq += output_mse(Y, Matrix(Xs * t.weights[i].transpose()));
      rtn += output_mse(Y, Matrix(l.X * fake_quant(l.W[i], spec).transpose()));
    }
    std::cout << "[ measured ] seed " << seed << ": alpha " << diag(t, "alpha") << ", output mse awq " << awq
              << " rtn " << rtn << " (x" << rtn / awq << ")\n";
    EXPECT_LT(awq, 0.8 * rtn);
  }
}

TEST(Awq, ClipSearchKeepsTheBestRatioPerGroup) {
  const Layer l = make_layer(5);
  const Matrix H = l.H.hessian();
  const QuantSpec spec = grid(3, 32);
  Matrix ratios;
  double before = 0, after = 0;
  const Matrix Wc = awq_clip(l.W[0], H, spec, 20, 0.5, &ratios, &before, &after);
  ASSERT_EQ(ratios.rows(), 48);
  ASSERT_EQ(ratios.cols(), 4);
  EXPECT_LT(after, before);
  EXPECT_GE(ratios.minCoeff(), 0.55f - 1e-6f);
  EXPECT_LE(ratios.maxCoeff(), 1.0f);
  EXPECT_LT(ratios.minCoeff(), 1.0f) << "some group is clipped at 3 bits";
  // The clamped weights never exceed the original range, and a ratio of 1 leaves a group as is.
  EXPECT_LE(Wc.cwiseAbs().maxCoeff(), l.W[0].cwiseAbs().maxCoeff());
  for (Index r = 0; r < 48; ++r)
    for (Index g = 0; g < 4; ++g)
      if (ratios(r, g) == 1.0f) {
        EXPECT_EQ(Wc.row(r).segment(32 * g, 32), l.W[0].row(r).segment(32 * g, 32));
      }
  // Per-tensor grids have no groups: unchanged.
  QuantSpec pt = spec;
  pt.granularity = Granularity::PerTensor;
  EXPECT_EQ(awq_clip(l.W[0], H, pt, 20, 0.5), l.W[0]);
}

TEST(Awq, LeavesFloatWeightsWhenALaterStepQuantizes) {
  const Layer l = make_layer(9);
  const ChannelScaleTransform t = run_awq("", l, grid(3, 32), /*quantize=*/false);
  for (std::size_t i = 0; i < l.W.size(); ++i) {
    EXPECT_FALSE(t.quantized[i].has_value());
    EXPECT_NE(t.weights[i], fake_quant(t.weights[i], grid(3, 32))) << "not on the grid";
  }
}

TEST(Awq, OptionErrorsPointAtTheKey) {
  EXPECT_NE(error_of("[{algorithm: awq, bits: 3, alpha: 2}]").find("quant.0.alpha"), std::string::npos);
  EXPECT_NE(error_of("[{algorithm: awq, bits: 3, alpha: 0.5, alpha_grid: [0, 1]}]").find("quant.0.alpha_grid"),
            std::string::npos);
  EXPECT_NE(error_of("[{algorithm: awq, bits: 3, clip: false, clip_grid: 10}]").find("quant.0.clip_grid"),
            std::string::npos);
  EXPECT_NE(error_of("[{algorithm: awq, bits: 3, clip_max_shrink: 1}]").find("quant.0.clip_max_shrink"),
            std::string::npos);
}

// ---- the folded model --------------------------------------------------------------------

bool have_data() { return fs::exists(kModel / "model.safetensors") && fs::exists(kData / "text" / "persuasion.txt"); }

/// Step 0 of `rc` (AWQ) on every input group of every block of `weights`, through the
/// pipeline's one path (apply_step), with the FP model's calibration statistics per group.
/// Returns max |log s| over the groups.
double apply_awq_step(const RunConfig& rc, ModelWeights& weights, const std::vector<std::vector<int32_t>>& calib,
                      std::vector<std::array<std::optional<QuantizedTensor>, kLinearKinds>>& codes) {
  const Architecture arch = Architecture::of(weights.config);
  const Pipeline pipeline(rc, default_registry());
  const int G = static_cast<int>(arch.input_groups().size());
  RunRecord rec;
  double max_log = 0;
  std::vector<Matrix> h;
  const Transformer fp(weights);
  for (auto& w : calib) h.push_back(fp.embed(w));
  codes.resize(weights.config.num_layers);
  for (int b = 0; b < weights.config.num_layers; ++b) {
    std::vector<HessianAccumulator> H;
    std::vector<ChannelStats> S;
    for (int g = 0; g < G; ++g) {
      H.emplace_back(arch.input_width(g));
      S.emplace_back(arch.input_width(g));
    }
    ForwardHooks hooks;
    hooks.capture_input = [&](int, LinearKind k, const Matrix& X) {
      const int g = arch.group_of(k);
      if (arch.input_groups()[g].members.front() != k) return;
      H[g].add(X);
      S[g].add(X);
    };
    const Transformer before(weights);
    for (auto& x : h) x = before.block(b, x, 0, &hooks);
    std::array<LayerRow, kLinearKinds> rows;
    std::array<const ActQuantSpec*, kLinearKinds> act{};
    DecoderBlock& blk = weights.blocks[b];
    for (int g = 0; g < G; ++g) {
      const InputGroup& grp = arch.input_groups()[g];
      InputGroupState s;
      s.input_name = grp.norm ? arch.norm_name(b, g) : linear_name(b, grp.members.front()) + ".input";
      for (LinearKind k : grp.members) {
        s.names.push_back(linear_name(b, k));
        s.weights.push_back(&blk.linear(k).W);
        s.rows.push_back(&rows[static_cast<int>(k)]);
        s.act.push_back(&act[static_cast<int>(k)]);
        s.codes.push_back(&codes[b][static_cast<int>(k)]);
        s.seed_streams.push_back(0);
      }
      VectorD scale = VectorD::Ones(arch.input_width(g));
      s.H = &H[g];
      s.S = &S[g];
      s.scale = &scale;
      s.norm = grp.norm ? &norm_weight(blk, grp) : nullptr;
      s.absorbs_scale = grp.norm != nullptr;
      if (!grp.norm && grp.scale_rows) {
        s.producer_rows = &blk.linear(*grp.scale_rows).W;
        s.producer_bias = &blk.linear(*grp.scale_rows).b;
        s.producer_codes = &codes[b][static_cast<int>(*grp.scale_rows)];
      }
      apply_step(pipeline, 0, s, rec);
      max_log = std::max(max_log, scale.array().log().abs().maxCoeff());
    }
  }
  return max_log;
}

TEST(AwqModel, FoldedModelKeepsTheFpFunctionWhenALaterStepQuantizes) {
  if (!have_data()) GTEST_SKIP() << "shared data not found at " << kData << "; this test needs the checkpoint";
  const ModelWeights fp = load_checkpoint(kModel.string());
  const Tokenizer tok = Tokenizer::load(kModel.string());
  const std::vector<int32_t> ids = stream_ids((kData / "text" / "persuasion.txt").string(), tok);
  const auto calib = calibration_windows(ids, 8, 256, CalibRule::Strided, 0);
  const std::vector<Window> eval = stream_windows(ids, 256);
  const Transformer fp_model(fp);
  const Matrix ref = fp_model.forward(eval.at(0).ids);
  const double logit_scale = ref.cwiseAbs().maxCoeff();

  // [awq, rtn]: AWQ scales and folds, the later rtn step quantizes, so step 0 leaves float
  // weights. Without clipping the folded model is the FP model up to float rounding.
  ModelWeights w = fp;
  std::vector<std::array<std::optional<QuantizedTensor>, kLinearKinds>> codes;
  const double max_log =
      apply_awq_step(parse("[{algorithm: awq, bits: 3, group_size: 64, granularity: group, clip: false}, "
                           "{algorithm: rtn, bits: 3, group_size: 64, granularity: group}]"),
                     w, calib, codes);
  EXPECT_GT(max_log, 0.2) << "the scales are far from 1, so the check is not vacuous";
  for (auto& blk : codes)
    for (auto& c : blk) EXPECT_FALSE(c.has_value());
  const Matrix out = Transformer(w).forward(eval.at(0).ids);
  const double diff = (out - ref).cwiseAbs().maxCoeff();
  std::cout << "[ measured ] max |log s| " << max_log << ", max |logit diff| " << diff << " (max |logit| "
            << logit_scale << ")\n";
  EXPECT_LT(diff, 1e-5 * logit_scale);
  // Up rows carry down's scale (W_up / s), and the norms carry the q/k/v and gate/up scales.
  EXPECT_NE(w.blocks[0].linear(LinearKind::Up).W, fp.blocks[0].linear(LinearKind::Up).W);
  EXPECT_NE(w.blocks[0].input_norm, fp.blocks[0].input_norm);

  // [awq] alone: every linear is left on the grid with codes.
  ModelWeights alone = fp;
  apply_awq_step(parse("[{algorithm: awq, bits: 3, group_size: 64, granularity: group}]"), alone, calib, codes);
  for (auto& blk : codes)
    for (auto& c : blk) EXPECT_TRUE(c.has_value());
}

}  // namespace
}  // namespace ql
