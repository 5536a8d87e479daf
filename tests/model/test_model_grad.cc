// The whole-model backward of core/model/model_grad.h: against central finite differences of
// the same forward in double on a tiny random model (both losses), and, chained from the
// embedding through blocks 0..2 of the shared model, against PyTorch autograd's block-2
// gradients (../shared/data/austen-llama-7m/golden/block2_grad.*) where they overlap.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/model/checkpoint.h"
#include "core/model/model_grad.h"
#include "core/model/safetensors.h"
#include "core/parallel.h"
#include "tests/fd_util.h"

namespace ql {
namespace {

namespace fs = std::filesystem;

/// Two blocks, hidden 8, GQA 2/1 heads of 4, vocab 11, untied head, q/k/v biases: every
/// parameter random.
ModelParams<double> tiny_model(BlockShape& s) {
  s.n_heads = 2;
  s.n_kv_heads = 1;
  s.head_dim = 4;
  s.eps = 1e-5;
  s.rope = RopeSpec(10000.0);
  const Index d = 8, ff = 12, V = 11, kvd = 4;
  uint64_t stream = 100;
  auto m = [&](Index r, Index c, double sc) { return fd::gaussian(r, c, 31, stream++, sc); };
  auto v = [&](Index n, double sc, double off) { return fd::gaussian_vec(n, 31, stream++, sc, off); };
  ModelParams<double> p;
  p.embed = m(V, d, 1.0);
  for (int b = 0; b < 2; ++b) {
    BlockParams<double> bp;
    bp.input_norm = v(d, 0.2, 1.0);
    bp.post_attn_norm = v(d, 0.2, 1.0);
    bp.q = m(d, d, 0.5);
    bp.k = m(kvd, d, 0.5);
    bp.v = m(kvd, d, 0.5);
    bp.o = m(d, d, 0.3);
    bp.gate = m(ff, d, 0.5);
    bp.up = m(ff, d, 0.5);
    bp.down = m(d, ff, 0.3);
    bp.bq = v(d, 0.1, 0.0);
    bp.bk = v(kvd, 0.1, 0.0);
    bp.bv = v(kvd, 0.1, 0.0);
    p.blocks.push_back(bp);
  }
  p.final_norm = v(d, 0.2, 1.0);
  p.lm_head = m(V, d, 0.7);
  return p;
}

const std::vector<std::vector<int32_t>> kWindows = {{1, 4, 9, 2, 2, 7}, {10, 0, 3, 5, 8, 1}};

/// Every parameter's gradient in g against central differences of loss() (1e-7): embedding,
/// lm_head, final norm, each block's seven linears, both norms and the v bias.
void expect_all_match_fd(const std::function<double()>& loss, ModelParams<double>& p, const ModelParams<double>& g) {
  constexpr double kTol = 1e-7;
  EXPECT_LT(fd::error(loss, p.embed.data(), p.embed.size(), g.embed.data()), kTol) << "embed";
  EXPECT_LT(fd::error(loss, p.lm_head.data(), p.lm_head.size(), g.lm_head.data()), kTol) << "lm_head";
  EXPECT_LT(fd::error(loss, p.final_norm.data(), p.final_norm.size(), g.final_norm.data()), kTol) << "final_norm";
  for (int b = 0; b < 2; ++b) {
    for (int k = 0; k < kLinearKinds; ++k) {
      MatrixD& W = p.blocks[b].linear(static_cast<LinearKind>(k));
      EXPECT_LT(fd::error(loss, W.data(), W.size(), g.blocks[b].linear(static_cast<LinearKind>(k)).data()), kTol)
          << "block " << b << " " << linear_suffix(static_cast<LinearKind>(k));
    }
    EXPECT_LT(fd::error(loss, p.blocks[b].input_norm.data(), 8, g.blocks[b].input_norm.data()), kTol);
    EXPECT_LT(fd::error(loss, p.blocks[b].post_attn_norm.data(), 8, g.blocks[b].post_attn_norm.data()), kTol);
    EXPECT_LT(fd::error(loss, p.blocks[b].bv.data(), 4, g.blocks[b].bv.data()), kTol);
  }
}

void expect_matches_fd(LmLoss kind) {
  BlockShape s;
  ModelParams<double> p = tiny_model(s);
  std::vector<Matrix> ref;
  for (int w = 0; w < 2; ++w) ref.push_back(fd::gaussian(6, 11, 7, 900 + w, 2.0).cast<float>());
  auto loss = [&] {
    ModelTape<double> t;
    return model_loss_fwd(s, p, kWindows, kind, &ref, t);
  };
  ModelTape<double> tape;
  const double l = model_loss_fwd(s, p, kWindows, kind, &ref, tape);
  EXPECT_GT(l, 0.0);
  ModelParams<double> g = ModelParams<double>::zeros_like(p);
  model_bwd(s, p, tape, g);
  expect_all_match_fd(loss, p, g);
}

TEST(ModelGrad, CrossEntropyMatchesFiniteDifferences) { expect_matches_fd(LmLoss::CrossEntropy); }
TEST(ModelGrad, KlToReferenceMatchesFiniteDifferences) { expect_matches_fd(LmLoss::KlToReference); }

// The loss itself: cross-entropy by hand for one scored position, and KL of a model against
// its own logits is 0 with a zero gradient.
TEST(ModelGrad, LossValues) {
  BlockShape s;
  const ModelParams<double> p = tiny_model(s);
  ModelTape<double> t;
  const std::vector<std::vector<int32_t>> one = {{3, 6}};
  const double ce = model_loss_fwd(s, p, one, LmLoss::CrossEntropy, nullptr, t);
  // Recompute -log softmax(z_0)[6] from the tape's gradient: dL/dz = q - onehot at N = 1.
  const double q6 = t.dlogits(0, 6) + 1.0;
  EXPECT_NEAR(ce, -std::log(q6), 1e-12);
  EXPECT_EQ(t.dlogits.row(1).norm(), 0.0) << "the last position predicts nothing";
  // KL to itself: reference = the model's own logits.
  ModelTape<double> t2;
  model_blocks_fwd(s, p, kWindows, 2, t2);
  std::vector<Matrix> self;
  {
    ModelTape<double> t3;
    model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, t3);
    for (int w = 0; w < 2; ++w) {
      const MatrixD logits = t3.xn.middleRows(w * 6, 6) * p.lm_head.transpose();
      self.push_back(logits.cast<float>());
    }
  }
  ModelTape<double> t4;
  const double kl = model_loss_fwd(s, p, kWindows, LmLoss::KlToReference, &self, t4);
  EXPECT_LT(std::abs(kl), 1e-7);
  EXPECT_LT(t4.dlogits.norm(), 1e-7);
  ModelTape<double> bad;
  EXPECT_THROW(model_loss_fwd(s, p, {{1, 2, 3}, {1, 2}}, LmLoss::CrossEntropy, nullptr, bad), ShapeError);
  EXPECT_THROW(model_loss_fwd(s, p, {{1, 11}}, LmLoss::CrossEntropy, nullptr, bad), ShapeError);
  EXPECT_THROW(model_loss_fwd(s, p, kWindows, LmLoss::KlToReference, nullptr, bad), ShapeError);
}

// Activation fake quantization in the training graph (InputQuant): the tape keeps the hook's
// output, so each weight's gradient is dYᵀ Q(X), and the input gradient passes straight through.
// A hook that adds a fixed offset, X + Δ, has the identity as its derivative, so the straight-
// through gradient is the exact one: finite differences over every parameter must match (they
// would not if the tape kept X, or if the hook ran at the wrong place). The hook sees each
// shared input once: Q, O, Gate, Down per block, in order.
TEST(ModelGrad, InputQuantIsStraightThrough) {
  BlockShape s;
  ModelParams<double> p = tiny_model(s);
  std::vector<std::string> calls;
  const ModelInputQuant<double> shift = [&](int b, LinearKind k, MatrixD& X) {
    calls.push_back(std::to_string(b) + linear_suffix(k));
    X += fd::gaussian(X.rows(), X.cols(), 5, 1000 + 10 * b + static_cast<int>(k), 0.3);
  };
  auto loss = [&] {
    ModelTape<double> t;
    return model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, t, shift);
  };
  ModelTape<double> tape, plain;
  const double l = model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, tape, shift);
  EXPECT_NE(l, model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, plain));
  EXPECT_EQ(calls, (std::vector<std::string>{"0self_attn.q_proj", "0self_attn.o_proj", "0mlp.gate_proj",
                                             "0mlp.down_proj", "1self_attn.q_proj", "1self_attn.o_proj",
                                             "1mlp.gate_proj", "1mlp.down_proj"}));
  ModelParams<double> g = ModelParams<double>::zeros_like(p);
  model_bwd(s, p, tape, g);
  expect_all_match_fd(loss, p, g);
  // A no-op hook changes nothing, bit for bit.
  ModelTape<double> t1, t2;
  const double a = model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, t1);
  const double c = model_loss_fwd(s, p, kWindows, LmLoss::CrossEntropy, nullptr, t2,
                                  ModelInputQuant<double>([](int, LinearKind, MatrixD&) {}));
  EXPECT_EQ(a, c);
  ModelParams<double> g1 = ModelParams<double>::zeros_like(p), g2 = ModelParams<double>::zeros_like(p);
  model_bwd(s, p, t1, g1);
  model_bwd(s, p, t2, g2);
  EXPECT_EQ(g1.embed, g2.embed);
  EXPECT_EQ(g1.blocks[0].q, g2.blocks[0].q);
}

TEST(ModelGrad, BitsDoNotDependOnTheThreadCount) {
  BlockShape s;
  const ModelParams<float> p = [&] {
    const ModelParams<double> d = tiny_model(s);
    ModelParams<float> f;
    f.embed = d.embed.cast<float>();
    for (const auto& b : d.blocks) {
      BlockParams<float> fb;
      fb.input_norm = b.input_norm.cast<float>();
      fb.post_attn_norm = b.post_attn_norm.cast<float>();
      for (int k = 0; k < kLinearKinds; ++k)
        fb.linear(static_cast<LinearKind>(k)) = b.linear(static_cast<LinearKind>(k)).cast<float>();
      fb.bq = b.bq.cast<float>();
      fb.bk = b.bk.cast<float>();
      fb.bv = b.bv.cast<float>();
      f.blocks.push_back(fb);
    }
    f.final_norm = d.final_norm.cast<float>();
    f.lm_head = d.lm_head.cast<float>();
    return f;
  }();
  std::vector<std::vector<int32_t>> windows(24, std::vector<int32_t>(40));
  for (std::size_t w = 0; w < windows.size(); ++w)
    for (std::size_t t = 0; t < 40; ++t) windows[w][t] = static_cast<int32_t>((w * 7 + t * 3 + 1) % 11);
  auto run = [&](int threads) {
    ThreadCountGuard guard(threads);
    ModelTape<float> t;
    const double l = model_loss_fwd(s, p, windows, LmLoss::CrossEntropy, nullptr, t);
    ModelParams<float> g = ModelParams<float>::zeros_like(p);
    model_bwd(s, p, t, g);
    return std::make_pair(l, g);
  };
  const auto a = run(1), b = run(2);
  EXPECT_EQ(a.first, b.first);
  EXPECT_EQ(a.second.embed, b.second.embed);
  EXPECT_EQ(a.second.lm_head, b.second.lm_head);
  for (int k = 0; k < kLinearKinds; ++k)
    EXPECT_EQ(a.second.blocks[0].linear(static_cast<LinearKind>(k)), b.second.blocks[0].linear(static_cast<LinearKind>(k)));
}

const fs::path kModel = fs::path(QL_SHARED_DATA_DIR) / "austen-llama-7m";

// Embedding -> blocks 0..2 in float, then the backward from dL/dy = r at block 2's output: the
// block-2 gradients of the chain equal PyTorch autograd's (float64) to 1e-4, and the hidden
// state entering block 2 equals the golden x (the chained forward overlaps the reference's).
TEST(ModelGrad, ChainedBlocksMatchPytorchAutogradOnBlock2) {
  const fs::path golden = kModel / "golden" / "block2_grad.safetensors";
  if (!fs::exists(golden)) GTEST_SKIP() << "needs " << golden;
  const ModelWeights w = load_checkpoint(kModel.string());
  std::ifstream in(kModel / "golden" / "golden.json");
  const auto ids = nlohmann::json::parse(in)["logits_first64"]["token_ids"].get<std::vector<int32_t>>();
  ASSERT_EQ(ids.size(), 64u);
  std::vector<std::vector<int32_t>> windows = {ids, std::vector<int32_t>(ids.rbegin(), ids.rend())};
  const SafetensorsFile f = SafetensorsFile::open(golden.string());
  const Index d = w.config.hidden_size, N = 128;
  auto get = [&](const std::string& name, Index r, Index c) {
    Matrix m(r, c);
    f.read_into(name, m.data(), m.size());
    return m;
  };
  const BlockShape s = BlockShape::of(w.config);
  const ModelParams<float> p = ModelParams<float>::from(w);
  ModelTape<float> tape;
  model_blocks_fwd(s, p, windows, 3, tape);
  auto rel = [](const Matrix& a, const Matrix& b) { return (a - b).norm() / b.norm(); };
  EXPECT_LT(rel(tape.blocks[2].x, get("x", N, d)), 1e-5) << "hidden state entering block 2";
  EXPECT_LT(rel(tape.blocks[2].y, get("y", N, d)), 1e-5) << "block 2 output";
  ModelParams<float> g = ModelParams<float>::zeros_like(p);
  model_blocks_bwd(s, p, tape, get("r", N, d), g);
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    const Matrix& gw = g.blocks[2].linear(kind);
    const std::string name = std::string("grad.") + linear_suffix(kind) + ".weight";
    EXPECT_LT(rel(gw, get(name, gw.rows(), gw.cols())), 1e-4) << name;
  }
  const Matrix ref_norm = get("grad.input_layernorm.weight", d, 1);
  EXPECT_LT((g.blocks[2].input_norm - Eigen::Map<const Vector>(ref_norm.data(), d)).norm() / ref_norm.norm(), 1e-4);
  // Blocks 0 and 1 and the embedding receive the chained gradient (no reference: nonzero, finite).
  EXPECT_GT(g.blocks[0].linear(LinearKind::Q).norm(), 0.0);
  EXPECT_TRUE(g.embed.allFinite());
  EXPECT_GT(g.embed.norm(), 0.0);
}

}  // namespace
}  // namespace ql
