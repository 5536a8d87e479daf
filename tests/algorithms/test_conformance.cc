// Conformance suite, parameterised over every registered algorithm: a new plugin is tested by
// being registered. Layer-scope plugins run on a layer with a correlated, outlier-heavy input
// covariance (white inputs would hide differences, ALGORITHMS.md §2.6).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>

#include "algorithms/algorithm.h"
#include "core/config_node.h"
#include "core/error.h"
#include "core/metrics.h"
#include "core/quantize.h"
#include "core/model/fold.h"
#include "core/model/transformer.h"
#include "core/rng.h"
#include "experiments/config.h"
#include "experiments/runner.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

/// A plugin's error may exceed RTN's on the same grid by at most this factor: anything that
/// quantizes is expected to at least match round-to-nearest on its own objective.
constexpr double kNoWorseThanRtnTolerance = 1.05;

RunConfig parse_text(const std::string& yaml) {
  ConfigNode root = ConfigNode::parse(yaml, "conformance.yaml");
  return parse_run_config(root, "conformance", "conformance.yaml", default_registry());
}

std::string step_yaml(const std::string& name, const std::string& extra = "") {
  const AlgorithmInfo& info = default_registry().get(name);
  std::string s = "quant:\n  - algorithm: " + name + "\n";
  if (info.uses_weight_spec) s += "    bits: 4\n    granularity: group\n    group_size: 32\n";
  // Block, KV-cache and model steps need a model workload (after the step, so line numbers stay).
  const bool model = info.scope == Scope::Block || info.scope == Scope::KvCache || info.scope == Scope::Model;
  return s + extra +
         (model ? "workload: {kind: model, path: /m}\ncalib: {text: /t.txt}\neval: {streams: [{name: p, path: /p.txt}]}\n"
                : "");
}

struct Layer {
  Matrix X;  ///< the calibration inputs (n x d_in)
  Matrix W;
  HessianAccumulator H;
  ChannelStats stats;
};

Layer make_layer() {
  const Index d_in = 96, d_out = 40, n = 512;
  CounterRng rng(11, 1);
  Layer l;
  l.W.resize(d_out, d_in);
  for (Index i = 0; i < l.W.size(); ++i) l.W.data()[i] = static_cast<float>(rng.normal(i) * 0.1);
  Matrix mix(d_in, d_in);
  CounterRng rm(11, 2);
  for (Index i = 0; i < mix.size(); ++i) mix.data()[i] = static_cast<float>(rm.normal(i));
  for (Index j = 0; j < d_in; ++j) mix.col(j) *= std::pow(1.0f + j, -0.7f);
  Matrix Z(n, d_in);
  CounterRng rz(11, 3);
  for (Index i = 0; i < Z.size(); ++i) Z.data()[i] = static_cast<float>(rz.normal(i));
  Matrix X = Z * mix.transpose();
  X.col(5) *= 10.0f;
  X.col(40) *= 10.0f;
  l.X = X;
  l.H = HessianAccumulator(d_in);
  l.H.add(X);
  l.stats = ChannelStats(d_in);
  l.stats.add(X);
  return l;
}

/// The registered plugins of one scope: each scope's contract is instantiated over exactly
/// those, so no plugin is skipped and a new plugin is driven by being registered.
std::vector<std::string> plugins_of(Scope scope) {
  std::vector<std::string> out;
  for (const std::string& n : default_registry().names())
    if (default_registry().get(n).scope == scope) out.push_back(n);
  return out;
}

class Conformance : public ::testing::TestWithParam<std::string> {};
class LayerConformance : public ::testing::TestWithParam<std::string> {};
class NormConsumersConformance : public ::testing::TestWithParam<std::string> {};
class KvCacheConformance : public ::testing::TestWithParam<std::string> {};
class BlockConformance : public ::testing::TestWithParam<std::string> {};
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(BlockConformance);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(LayerConformance);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(NormConsumersConformance);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(KvCacheConformance);

TEST_P(LayerConformance, Contract) {
  const std::string name = GetParam();
  const AlgorithmInfo& info = default_registry().get(name);
  ASSERT_EQ(info.scope, Scope::Layer);
  RunConfig rc = parse_text(step_yaml(name));
  const QuantStep& step = rc.quant.at(0);
  Layer l = make_layer();
  auto algo = info.create(step.options);
  auto* la = dynamic_cast<LayerAlgorithm*>(algo.get());
  ASSERT_NE(la, nullptr);
  LayerInput in{"conf", &l.W, &l.H, &l.stats, step.weight, 7};
  LayerResult a = la->run(in);
  LayerResult b = la->run(in);

  EXPECT_TRUE(a.output.W.allFinite());
  EXPECT_EQ(a.output.W, b.output.W) << "not deterministic for a fixed seed";
  if (step.weight.quantized()) {
    ASSERT_TRUE(a.output.quantized.has_value()) << name << " returned no codes";
    const QuantizedTensor& q = *a.output.quantized;
    EXPECT_GE(q.codes.minCoeff(), step.weight.qmin());
    EXPECT_LE(q.codes.maxCoeff(), step.weight.qmax());
    // Compare with RTN on the same grid and the same objective.
    RunConfig rtn = parse_text(step_yaml("rtn"));
    auto r = default_registry().get("rtn").create(rtn.quant[0].options);
    LayerInput rin{"conf", &l.W, &l.H, &l.stats, rtn.quant[0].weight, 7};
    LayerResult rr = dynamic_cast<LayerAlgorithm*>(r.get())->run(rin);
    EXPECT_LE(a.metrics.rel_output_error_h, rr.metrics.rel_output_error_h * kNoWorseThanRtnTolerance);
    EXPECT_GT(a.metrics.rel_output_error_h, 0.0);
    EXPECT_LT(a.metrics.bits_per_weight, 16.0);
  } else {
    EXPECT_EQ(a.metrics.bits_per_weight, 16.0);
  }
}

TEST_P(NormConsumersConformance, Contract) {
  const std::string name = GetParam();
  const AlgorithmInfo& info = default_registry().get(name);
  ASSERT_EQ(info.scope, Scope::NormConsumers);
  RunConfig rc = parse_text(step_yaml(name));
  const QuantStep& step = rc.quant.at(0);
  const Layer l = make_layer();
  Matrix W2(24, l.W.cols());  // a second linear reading the same input (q/k/v, gate/up)
  CounterRng rw(11, 4);
  for (Index i = 0; i < W2.size(); ++i) W2.data()[i] = static_cast<float>(rw.normal(i) * 0.3);
  auto algo = info.create(step.options);
  auto* na = dynamic_cast<NormConsumerAlgorithm*>(algo.get());
  ASSERT_NE(na, nullptr);
  NormConsumerInput in;
  in.name = "conf.norm";
  in.consumer_names = {"conf.a", "conf.b"};
  in.consumers = {&l.W, &W2};
  in.input_stats = &l.stats;
  in.hessian = &l.H;
  if (info.uses_weight_spec) {  // a plugin with a grid (AWQ) quantizes the consumers itself
    in.spec = &step.weight;
    in.quantize = true;
  }
  const ChannelScaleTransform a = na->run(in);
  const ChannelScaleTransform b = na->run(in);
  EXPECT_EQ(a.weights, b.weights) << "not deterministic";

  ASSERT_EQ(a.scales.size(), l.W.cols());
  for (Index j = 0; j < a.scales.size(); ++j)
    EXPECT_TRUE(a.scales[j] > 0 && std::isfinite(a.scales[j])) << "scale " << j;
  EXPECT_EQ(a.scales, b.scales) << "not deterministic";
  EXPECT_EQ(a.diagnostics, b.diagnostics) << "not deterministic";

  // The transform, folded into a producer (norm weight 1) and both consumers, is an
  // equivalence: the outputs match the original ones to float rounding.
  Vector gamma = Vector::Ones(l.W.cols());
  Matrix V1 = l.W, V2 = W2;
  fold_channel_scales(gamma, {&V1, &V2}, a.scales);
  const Matrix Xs = l.X * gamma.asDiagonal();
  for (auto [W, V] : {std::pair<const Matrix*, const Matrix*>{&l.W, &V1}, {&W2, &V2}}) {
    const Matrix Y = l.X * W->transpose();
    EXPECT_LT((Xs * V->transpose() - Y).cwiseAbs().maxCoeff(), 1e-5 * Y.cwiseAbs().maxCoeff());
  }
  // Returned weights act on x' = x / s: their codes reconstruct them, and the outputs are no
  // worse than RTN's of the unscaled weights on the same grid.
  if (info.uses_weight_spec && step.weight.quantized()) {
    ASSERT_EQ(a.weights.size(), 2u) << name << " quantizes through its returned weights";
    const Matrix Xq = l.X * a.scales.cwiseInverse().cast<float>().asDiagonal();
    for (std::size_t i = 0; i < 2; ++i) {
      const Matrix& W = i ? W2 : l.W;
      ASSERT_TRUE(a.quantized[i].has_value());
      EXPECT_EQ(dequantize(*a.quantized[i]), a.weights[i]);
      const Matrix Y = l.X * W.transpose();
      const double mine = output_mse(Y, Matrix(Xq * a.weights[i].transpose()));
      const double rtn = output_mse(Y, Matrix(l.X * fake_quant(W, step.weight).transpose()));
      EXPECT_LE(mine, rtn * kNoWorseThanRtnTolerance) << "consumer " << i;
    }
  }

  // Statistics of another width are a ShapeError from run(), before the plugin.
  ChannelStats other(l.W.cols() + 1);
  in.input_stats = &other;
  EXPECT_THROW(na->run(in), ShapeError);

}

TEST_P(Conformance, RejectsBadOptionWithKeyPath) {
  const std::string name = GetParam();
  const AlgorithmInfo& info = default_registry().get(name);
  // An unknown key is rejected at its line with the full key path.
  try {
    parse_text(step_yaml(name, "    bogus_option: 1\n"));
    FAIL() << name << " accepted an unknown option";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.0.bogus_option") << e.what();
    EXPECT_EQ(e.loc().line, info.uses_weight_spec ? 6 : 3) << e.what();
    EXPECT_NE(std::string(e.what()).find("conformance.yaml:"), std::string::npos);
  }
  // Every option of the plugin rejects a malformed value at its own key path and line.
  for (const std::string& key : info.options->keys()) {
    try {
      parse_text(step_yaml(name, "    " + key + ": {bad: 1}\n"));
      ADD_FAILURE() << name << " accepted a map for option " << key;
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key_path(), "quant.0." + key) << e.what();
      EXPECT_EQ(e.loc().line, info.uses_weight_spec ? 6 : 3) << e.what();
    }
  }
  // A grid key is either out of range (grid plugins) or not accepted at all (no grid).
  const std::string bad = info.uses_weight_spec ? "quant:\n  - algorithm: " + name + "\n    bits: 9\n"
                                                : "quant:\n  - algorithm: " + name + "\n    bits: 4\n";
  try {
    parse_text(bad);
    FAIL() << name << " accepted a bad bits value";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.key_path(), "quant.0.bits") << e.what();
    EXPECT_EQ(e.loc().line, 3) << e.what();
  }
}

/// The registered plugin `name` of scope `scope`, built with the options a default step parses to.
std::unique_ptr<Algorithm> plugin_at_defaults(const std::string& name, Scope scope) {
  const AlgorithmInfo& info = default_registry().get(name);
  EXPECT_EQ(info.scope, scope) << name;
  // Defaults, except where the plugin names the options that fit the tests' tiny shapes.
  std::string extra;
  if (!info.tiny_model_options.empty()) {
    std::string opts = info.tiny_model_options;
    for (std::size_t p = 0; (p = opts.find(", ", p)) != std::string::npos;) opts.replace(p, 2, "\n    ");
    extra = "    " + opts + "\n";
  }
  return info.create(parse_text(step_yaml(name, extra)).quant.at(0).options);
}

TEST_P(KvCacheConformance, Contract) {
  const std::string name = GetParam();
  const auto algo = plugin_at_defaults(name, Scope::KvCache);
  const auto& ka = dynamic_cast<const KvCacheAlgorithm&>(*algo);
  // Keys and values of 4 query heads on 2 kv heads of head_dim 16, 256 calibration tokens,
  // with two outlier key channels (the structure KV quantizers are designed around).
  KvCacheInput in;
  in.name = "conf.self_attn";
  in.heads = HeadLayout{4, 2, 16};
  in.rope = RopePairing{16, 10000.0};
  const Index kvd = in.heads.kv_dim(), T = 256;
  Matrix K(T, kvd), V(T, kvd);
  CounterRng rk(11, 21), rv(11, 22);
  for (Index i = 0; i < K.size(); ++i) K.data()[i] = static_cast<float>(rk.normal(i));
  for (Index i = 0; i < V.size(); ++i) V.data()[i] = static_cast<float>(rv.normal(i));
  K.col(3) *= 8.0f;
  K.col(20) *= 8.0f;
  Matrix Q(T, in.heads.q_dim());
  CounterRng rq(11, 23);
  for (Index i = 0; i < Q.size(); ++i) Q.data()[i] = static_cast<float>(rq.normal(i));
  in.keys_pre_rope = &K;
  in.keys_post_rope = &K;
  in.values = &V;
  in.queries = &Q;
  in.window_rows = {T / 2, T / 2};  // as the runner captures them: two windows
  const KvCacheResult a = ka.run(in), b = ka.run(in);
  ASSERT_TRUE(a.quantizer) << name << " at its defaults keeps the cache exact";
  // The held-out error diagnostics every KV-cache step reports.
  for (const char* d : {"key_rel_mse", "value_rel_mse", "attn_score_rel_err", "attn_top8_agreement"}) {
    const auto it = std::find_if(a.diagnostics.begin(), a.diagnostics.end(), [&](const auto& x) { return x.first == d; });
    ASSERT_NE(it, a.diagnostics.end()) << name << " " << d;
    EXPECT_TRUE(std::isfinite(it->second) && it->second >= 0) << name << " " << d;
  }
  // Deterministic, storage below 16 bits, and the quantized values are close to the inputs.
  const KvQuantizer& q = *a.quantizer;
  for (KvKind kind : {KvKind::Key, KvKind::Value}) {
    const Matrix& X = kind == KvKind::Key ? K : V;
    const Index c = kind == KvKind::Key ? q.key_chunk() : q.value_chunk();
    const Matrix rows = X.topRows(T / c * c);
    Matrix xa, xb;
    q.decode(q.encode(kind, rows), xa);
    b.quantizer->decode(b.quantizer->encode(kind, rows), xb);
    EXPECT_EQ(xa, xb) << "not deterministic";
    EXPECT_TRUE(xa.allFinite());
    EXPECT_LT((xa - rows).norm(), 0.5 * rows.norm()) << "quantized " << (kind == KvKind::Key ? "keys" : "values");
  }
  EXPECT_LT(q.kv_bits(T, kvd), 16.0);
  EXPECT_GT(q.kv_bits(T, kvd), 0.0);
  // Captures of another width are a ShapeError from run(), before the plugin.
  const Matrix narrow(T, kvd - 1);
  in.values = &narrow;
  EXPECT_THROW(ka.run(in), ShapeError);
}

/// A one-block LLaMA model with GQA (4 heads on 2 kv heads) and random weights.
std::shared_ptr<const ModelWeights> one_block_model() {
  auto w = std::make_shared<ModelWeights>();
  ModelConfig& c = w->config;
  c.architecture = "LlamaForCausalLM";
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 1;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 50;
  c.max_position_embeddings = 64;
  uint64_t stream = 30;
  auto rnd = [&](Index r, Index k, double sd) {
    CounterRng g(11, stream++);
    Matrix m(r, k);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(sd * g.normal(i));
    return m;
  };
  w->embed = rnd(50, 32, 1.0);
  w->lm_head = rnd(50, 32, 0.2);
  w->final_norm = Vector::Ones(32);
  DecoderBlock b;
  b.input_norm = Vector::Ones(32);
  b.post_attn_norm = Vector::Ones(32);
  b.q.W = rnd(32, 32, 0.2);
  b.k.W = rnd(16, 32, 0.2);
  b.v.W = rnd(16, 32, 0.2);
  b.o.W = rnd(32, 32, 0.2);
  b.gate.W = rnd(48, 32, 0.2);
  b.up.W = rnd(48, 32, 0.2);
  b.down.W = rnd(32, 48, 0.2);
  w->blocks.push_back(b);
  return w;
}

/// The synthetic suite's standalone inputs: a deterministic transform of the asked width when
/// the plugin declares them, an error naming the limitation otherwise.
void check_standalone(const BlockAlgorithm& ba, const std::string& name) {
  // Trained transforms get calibration inputs, the consumer's weight and W4A4 quantizers.
  Matrix Xs(96, 48), Ws(20, 48);
  const CounterRng srng(91, 0);
  for (Index i = 0; i < Xs.size(); ++i) Xs.data()[i] = static_cast<float>(srng.normal(static_cast<uint64_t>(i)));
  for (Index i = 0; i < Ws.size(); ++i) Ws.data()[i] = static_cast<float>(0.1 * srng.normal(static_cast<uint64_t>(i + Xs.size())));
  QuantSpec w4;
  w4.bits = 4;
  ActQuantSpec a4;
  a4.bits = 4;
  auto standalone = [&](uint64_t stream) {
    StandaloneInput si;
    si.name = "conf";
    si.width = 48;
    si.stream = stream;
    si.X_calib = &Xs;
    si.weights = {&Ws};
    si.weight_spec = &w4;
    si.act_spec = &a4;
    return ba.run_standalone(si);
  };
  if (default_registry().get(name).standalone_inputs) {
    const auto s1 = standalone(3), s2 = standalone(3);
    ASSERT_TRUE(s1.transform && s2.transform);
    EXPECT_EQ(s1.transform->width(), 48);
    EXPECT_EQ(s1.transform->matrix(), s2.transform->matrix()) << "not deterministic";
    EXPECT_NE(s1.transform->matrix(), standalone(4).transform->matrix()) << "streams must differ";
  } else {
    EXPECT_THROW(standalone(3), Error);
  }
}

TEST_P(BlockConformance, Contract) {
  const std::string name = GetParam();
  const auto algo = plugin_at_defaults(name, Scope::Block);
  const auto& ba = dynamic_cast<const BlockAlgorithm&>(*algo);
  const auto fp = one_block_model();
  QuantizedModel qm(fp);
  BlockInput in;
  in.name = "model.layers.0";
  in.arch = &qm.architecture();
  in.config = &qm.config();
  in.weights = &qm.block(0);
  in.kv_quantized = true;
  // Plugins that train on the block get calibration windows, the FP block's outputs and W4A4.
  std::vector<Matrix> inputs, targets;
  QuantSpec w4;
  w4.bits = 4;
  w4.scheme = QuantScheme::Sym;
  ActQuantSpec a4;
  a4.bits = 4;
  if (default_registry().get(name).needs.block_io) {
    const CounterRng wrng(77, 0);
    for (int w = 0; w < 4; ++w) {
      Matrix h(16, 32);
      for (Index i = 0; i < h.size(); ++i) h.data()[i] = static_cast<float>(wrng.normal(static_cast<uint64_t>(w * 1000 + i)));
      targets.push_back(Transformer(*fp).block(0, h));
      inputs.push_back(std::move(h));
    }
    in.inputs = &inputs;
    in.targets = &targets;
    in.weight_spec = &w4;
    in.act_spec = &a4;
  }
  const BlockResult a = ba.run(in), b = ba.run(in);
  ASSERT_FALSE(a.transforms.empty()) << name << " returned no transform at its defaults";
  for (int sl = 0; sl < kTransformSlots; ++sl) {
    ASSERT_EQ(static_cast<bool>(a.transforms.slot[sl]), static_cast<bool>(b.transforms.slot[sl]));
    if (a.transforms.slot[sl]) {
      EXPECT_EQ(a.transforms.slot[sl]->matrix(), b.transforms.slot[sl]->matrix()) << "not deterministic";
    }
  }
  // Learned clipping, where returned, is a ratio in (0, 1] of each row's / token's range, the
  // same on a second run.
  for (int k = 0; k < kLinearKinds; ++k) {
    const RowClip& c = a.transforms.weight_clip[k];
    if (!c.empty()) {
      EXPECT_GT(c.lo.minCoeff(), 0.0f);
      EXPECT_LE(c.hi.maxCoeff(), 1.0f);
      EXPECT_EQ(c.hi, b.transforms.weight_clip[k].hi) << "not deterministic";
    }
    EXPECT_GT(a.transforms.act_clip[k].hi, 0.0f);
    EXPECT_LE(a.transforms.act_clip[k].hi, 1.0f);
  }
  // Installed without the clipping (a deliberate change of the weights and activations), the
  // transforms leave the block's function unchanged (before quantization).
  BlockTransforms exact = a.transforms;
  exact.weight_clip = {};
  exact.act_clip = {};
  qm.apply_transforms(0, exact);
  std::vector<int32_t> tokens(20);
  for (int t = 0; t < 20; ++t) tokens[t] = (7 * t + 3) % 50;
  const Matrix ref = Transformer(*fp).forward(tokens);
  const ForwardHooks h = qm.hooks();
  const Matrix out = Transformer(qm.current()).forward(tokens, &h);
  EXPECT_LT((out - ref).cwiseAbs().maxCoeff(), 1e-4 * ref.cwiseAbs().maxCoeff());
  // Non-finite weights are a NumericError from run(), before the plugin.
  DecoderBlock bad = qm.block(0);
  bad.up.W(0, 0) = std::numeric_limits<float>::quiet_NaN();
  in.weights = &bad;
  EXPECT_THROW(ba.run(in), NumericError);
  check_standalone(ba, name);
}

class ModelConformance : public ::testing::TestWithParam<std::string> {};

// A model-scope plugin at its defaults, on a one-block model quantized to W4 with codes: the
// same seed gives the same weights bitwise; the FP weights stay; run() has checked that codes
// and weights agree.
TEST_P(ModelConformance, Contract) {
  const std::string name = GetParam();
  const auto algo = plugin_at_defaults(name, Scope::Model);
  const auto& ma = dynamic_cast<const ModelAlgorithm&>(*algo);
  const auto fp = one_block_model();
  const ModelWeights fp_copy = *fp;
  std::vector<std::vector<int32_t>> windows(4, std::vector<int32_t>(16));
  for (int w = 0; w < 4; ++w)
    for (int t = 0; t < 16; ++t) windows[w][t] = (11 * w + 7 * t + 3) % 50;
  QuantSpec spec;
  spec.bits = 4;
  auto run_once = [&] {
    auto qm = std::make_unique<QuantizedModel>(fp);
    for (int k = 0; k < kLinearKinds; ++k) {
      QuantizedTensor q = quantize(qm->block(0).linear(static_cast<LinearKind>(k)).W, spec);
      qm->block(0).linear(static_cast<LinearKind>(k)).W = dequantize(q);
      qm->codes(0, static_cast<LinearKind>(k)) = std::move(q);
    }
    ModelInput in;
    in.model = qm.get();
    in.windows = &windows;
    in.seed = 5;
    ma.run(in);
    return qm;
  };
  const auto a = run_once(), b = run_once();
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    EXPECT_EQ(a->block(0).linear(kind).W, b->block(0).linear(kind).W) << "not deterministic";
    EXPECT_EQ(fp->blocks[0].linear(kind).W, fp_copy.blocks[0].linear(kind).W) << "FP weights changed";
  }
  ModelInput empty;
  empty.model = nullptr;
  EXPECT_THROW(ma.run(empty), ShapeError);
}

/// A tiny LLaMA checkpoint (hidden 8, 2 blocks, GQA 2/1 heads; deterministic pattern weights)
/// and a token-id file for calibration and evaluation, written once per process.
const std::string& tiny_model_dir() {
  static const std::string dir = [] {
    const std::string d = testutil::fresh_dir("conformance_e2e");
    const auto cfg = testutil::tiny_config();
    testutil::write_checkpoint(d, cfg, testutil::tiny_model_tensors(cfg));
    std::ofstream ids(d + "/ids.txt");
    for (int w = 0; w < 6; ++w) {
      for (int t = 0; t < 24; ++t) ids << (t ? " " : "") << (5 * w + 3 * t + 1) % 16;
      ids << "\n";
    }
    return d;
  }();
  return dir;
}

/// A pipeline that exercises plugin `name` at its scope with W4 weights around it.
std::string pipeline_with(const std::string& name) {
  const AlgorithmInfo& info = default_registry().get(name);
  const std::string w4 = "{algorithm: rtn, bits: 4, granularity: channel}";
  const std::string self = info.uses_weight_spec ? "{algorithm: " + name + ", bits: 4, granularity: channel}"
                                                 : "{algorithm: " + name +
                                                       (info.tiny_model_options.empty() ? "" : ", " + info.tiny_model_options) + "}";
  switch (info.scope) {
    case Scope::Layer: return "[" + self + "]";
    case Scope::NormConsumers:
    case Scope::Block: return "[" + self + ", " + w4 + "]";
    case Scope::KvCache:
    case Scope::Model: return "[" + w4 + ", " + self + "]";
  }
  return "";
}

// Every registered plugin runs from a config through the runner: on the synthetic suite where
// its scope applies there, and on a tiny LLaMA checkpoint the test writes (no ../shared
// needed, so nothing is skipped).
TEST_P(Conformance, RunsEndToEndOnTheSyntheticSuiteAndATinyModel) {
  const std::string name = GetParam();
  const AlgorithmInfo& info = default_registry().get(name);
  const bool synthetic = info.scope == Scope::Layer || info.scope == Scope::NormConsumers ||
                         (info.scope == Scope::Block && info.standalone_inputs);
  WorkloadCache cache;
  auto run = [&](const std::string& yaml) {
    RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "e2e.yaml"), "e2e", "e2e.yaml", default_registry());
    const RunRecord r = execute_run(rc, cache, default_registry());
    EXPECT_EQ(r.status, RunStatus::Ok) << name << ": " << r.message;
    EXPECT_FALSE(r.summary.empty()) << name;
    for (auto& s : r.summary) {
      if (s.metric.find("ppl") != std::string::npos || s.metric == "out_rel_err") {
        EXPECT_TRUE(std::isfinite(s.value)) << name << " " << s.metric;
      }
    }
    return r;
  };
  if (synthetic) {
    const RunRecord r = run("workload: {kind: synthetic, layers: [{name: l, d_in: 48, d_out: 40}], outlier_channels: 2}\n"
                            "calib: {tokens: 256}\neval: {units: 8, unit_tokens: 16}\nslices: {n_boot: 0}\nquant: " +
                            pipeline_with(name) + "\n");
    EXPECT_EQ(r.layers.size(), 1u) << name;
  }
  const std::string d = tiny_model_dir();
  const std::string model_yaml = "workload: {kind: model, path: " + d + "}\ncalib: {ids: " + d +
                                 "/ids.txt, n_samples: 4, seq_len: 16}\neval: {seq_len: 16, token_ids: [{name: t, path: " +
                                 d + "/ids.txt}]}\nslices: {n_boot: 0}\nquant: " + pipeline_with(name) + "\n";
  const RunRecord r = run(model_yaml);
  EXPECT_EQ(r.layers.size(), 2u * kLinearKinds) << name;
}

auto param_name = [](const ::testing::TestParamInfo<std::string>& p) { return p.param; };
INSTANTIATE_TEST_SUITE_P(AllRegistered, Conformance, ::testing::ValuesIn(default_registry().names()), param_name);
INSTANTIATE_TEST_SUITE_P(AllRegistered, LayerConformance, ::testing::ValuesIn(plugins_of(Scope::Layer)), param_name);
INSTANTIATE_TEST_SUITE_P(AllRegistered, NormConsumersConformance,
                         ::testing::ValuesIn(plugins_of(Scope::NormConsumers)), param_name);
INSTANTIATE_TEST_SUITE_P(AllRegistered, BlockConformance, ::testing::ValuesIn(plugins_of(Scope::Block)), param_name);
INSTANTIATE_TEST_SUITE_P(AllRegistered, KvCacheConformance, ::testing::ValuesIn(plugins_of(Scope::KvCache)),
                         param_name);
INSTANTIATE_TEST_SUITE_P(AllRegistered, ModelConformance, ::testing::ValuesIn(plugins_of(Scope::Model)), param_name);

}  // namespace
}  // namespace ql
