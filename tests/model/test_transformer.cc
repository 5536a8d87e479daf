#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "algorithms/algorithm.h"
#include "core/config_node.h"
#include "core/model/architecture.h"
#include "core/model/transforms.h"
#include "core/model/checkpoint.h"
#include "core/model/quantized_model.h"
#include "core/model/transformer.h"
#include "core/parallel.h"
#include "core/rng.h"

namespace ql {
namespace {

struct TinySpec {
  std::string architecture = "LlamaForCausalLM";
  int hidden = 64, heads = 4, kv_heads = 2, head_dim = 16, inter = 160, vocab = 300, layers = 3;
  bool qkv_bias = false;
  double theta = 10000.0;
};

Matrix random_matrix(Index r, Index c, double scale, uint64_t stream) {
  CounterRng rng(7, stream);
  Matrix m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * rng.normal(i));
  return m;
}

Vector random_vector(Index n, double mean, double scale, uint64_t stream) {
  CounterRng rng(7, stream);
  Vector v(n);
  for (Index i = 0; i < n; ++i) v[i] = static_cast<float>(mean + scale * rng.normal(i));
  return v;
}

/// Small random LLaMA-family weights: W ~ N(0, 1/d_in) keeps activations O(1).
ModelWeights tiny_model(const TinySpec& s) {
  ModelWeights w;
  ModelConfig& c = w.config;
  c.architecture = s.architecture;
  c.hidden_size = s.hidden;
  c.intermediate_size = s.inter;
  c.num_layers = s.layers;
  c.num_heads = s.heads;
  c.num_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.vocab_size = s.vocab;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope = RopeSpec(s.theta);
  c.attention_bias = s.qkv_bias;
  uint64_t stream = 1;
  w.embed = random_matrix(s.vocab, s.hidden, 1.0, stream++);
  const int qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  auto linear = [&](int d_out, int d_in, bool bias) {
    Linear l;
    l.W = random_matrix(d_out, d_in, 1.0 / std::sqrt(double(d_in)), stream++);
    if (bias) l.b = random_vector(d_out, 0.0, 0.5, stream++);
    return l;
  };
  for (int b = 0; b < s.layers; ++b) {
    DecoderBlock blk;
    blk.input_norm = random_vector(s.hidden, 1.0, 0.2, stream++);
    blk.post_attn_norm = random_vector(s.hidden, 1.0, 0.2, stream++);
    blk.q = linear(qd, s.hidden, s.qkv_bias);
    blk.k = linear(kvd, s.hidden, s.qkv_bias);
    blk.v = linear(kvd, s.hidden, s.qkv_bias);
    blk.o = linear(s.hidden, qd, false);
    blk.gate = linear(s.inter, s.hidden, false);
    blk.up = linear(s.inter, s.hidden, false);
    blk.down = linear(s.hidden, s.inter, false);
    w.blocks.push_back(std::move(blk));
  }
  w.final_norm = random_vector(s.hidden, 1.0, 0.2, stream++);
  w.lm_head = random_matrix(s.vocab, s.hidden, 1.0 / std::sqrt(double(s.hidden)), stream++);
  return w;
}

std::vector<int32_t> random_tokens(size_t n, int vocab, uint64_t stream) {
  CounterRng rng(11, stream);
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(rng.below(i, vocab));
  return t;
}

bool bitwise_equal(const Matrix& a, const Matrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

float max_abs_diff(const Matrix& a, const Matrix& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

/// Restores the OpenMP thread count when a test changes it.
struct ThreadGuard {
  int saved = num_threads();
  ~ThreadGuard() { set_num_threads(saved); }
};

// ---- an independent, deliberately naive double-precision reference ----

MatrixD ref_rms_norm(const MatrixD& h, const Vector& w, double eps) {
  MatrixD out(h.rows(), h.cols());
  for (Index t = 0; t < h.rows(); ++t) {
    const double ms = h.row(t).squaredNorm() / double(h.cols());
    for (Index j = 0; j < h.cols(); ++j) out(t, j) = double(w[j]) * h(t, j) / std::sqrt(ms + eps);
  }
  return out;
}

MatrixD ref_linear(const MatrixD& x, const Linear& l) {
  MatrixD y = x * l.W.cast<double>().transpose();
  if (l.b.size()) y.rowwise() += l.b.cast<double>().transpose();
  return y;
}

/// Rotate-half RoPE with angles in double: pairs (i, i + head_dim/2) of each head.
void ref_rope(MatrixD& X, int n_heads, int head_dim, double theta, int64_t pos0) {
  const int half = head_dim / 2;
  for (Index t = 0; t < X.rows(); ++t)
    for (int hh = 0; hh < n_heads; ++hh)
      for (int i = 0; i < half; ++i) {
        const double a = double(pos0 + t) * std::pow(theta, -2.0 * i / head_dim);
        double& x1 = X(t, hh * head_dim + i);
        double& x2 = X(t, hh * head_dim + i + half);
        const double y1 = x1 * std::cos(a) - x2 * std::sin(a);
        const double y2 = x2 * std::cos(a) + x1 * std::sin(a);
        x1 = y1;
        x2 = y2;
      }
}

MatrixD ref_forward(const ModelWeights& w, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = w.config;
  const Index T = tokens.size();
  MatrixD h(T, c.hidden_size);
  for (Index t = 0; t < T; ++t) h.row(t) = w.embed.row(tokens[t]).cast<double>();
  for (const DecoderBlock& blk : w.blocks) {
    MatrixD x = ref_rms_norm(h, blk.input_norm, c.rms_norm_eps);
    MatrixD Q = ref_linear(x, blk.q), K = ref_linear(x, blk.k), V = ref_linear(x, blk.v);
    ref_rope(Q, c.num_heads, c.head_dim, c.rope.theta, 0);
    ref_rope(K, c.num_kv_heads, c.head_dim, c.rope.theta, 0);
    MatrixD attn = MatrixD::Zero(T, Index(c.num_heads) * c.head_dim);
    const int per_kv = c.num_heads / c.num_kv_heads;
    for (int hh = 0; hh < c.num_heads; ++hh) {
      const int g = hh / per_kv;
      for (Index t = 0; t < T; ++t) {
        std::vector<double> s(t + 1);
        double mx = -1e300, sum = 0;
        for (Index u = 0; u <= t; ++u) {
          double dot = 0;
          for (int i = 0; i < c.head_dim; ++i)
            dot += Q(t, hh * c.head_dim + i) * K(u, g * c.head_dim + i);
          s[u] = dot / std::sqrt(double(c.head_dim));
          mx = std::max(mx, s[u]);
        }
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (Index u = 0; u <= t; ++u)
          for (int i = 0; i < c.head_dim; ++i)
            attn(t, hh * c.head_dim + i) += s[u] / sum * V(u, g * c.head_dim + i);
      }
    }
    h += ref_linear(attn, blk.o);
    x = ref_rms_norm(h, blk.post_attn_norm, c.rms_norm_eps);
    MatrixD G = ref_linear(x, blk.gate), U = ref_linear(x, blk.up);
    for (Index i = 0; i < G.size(); ++i) {
      const double g = G.data()[i];
      G.data()[i] = g / (1.0 + std::exp(-g)) * U.data()[i];
    }
    h += ref_linear(G, blk.down);
  }
  return ref_rms_norm(h, w.final_norm, c.rms_norm_eps) * w.lm_head.cast<double>().transpose();
}

// ---- tests ----

TEST(Transformer, MatchesNaiveDoubleReferenceWithGqa) {
  const ModelWeights w = tiny_model(TinySpec{});  // 4 heads over 2 kv heads
  const Transformer model(w);
  const auto tokens = random_tokens(37, w.config.vocab_size, 1);
  const Matrix logits = model.forward(tokens);
  ASSERT_EQ(logits.rows(), 37);
  ASSERT_EQ(logits.cols(), w.config.vocab_size);
  const float diff = max_abs_diff(logits, ref_forward(w, tokens).cast<float>());
  EXPECT_LT(diff, 2e-5) << "max abs diff vs double reference " << diff;
  EXPECT_GT(logits.cwiseAbs().maxCoeff(), 0.5f);  // not a degenerate comparison
}

TEST(Transformer, MatchesReferenceQwen2BiasAndWideGroups) {
  TinySpec s;
  s.architecture = "Qwen2ForCausalLM";
  s.heads = 6;
  s.kv_heads = 2;  // 3 query heads per kv head
  s.head_dim = 8;
  s.hidden = 48;
  s.qkv_bias = true;
  s.theta = 1000000.0;
  const ModelWeights w = tiny_model(s);
  const Transformer model(w);
  const auto tokens = random_tokens(29, s.vocab, 2);
  const Matrix logits = model.forward(tokens);
  EXPECT_LT(max_abs_diff(logits, ref_forward(w, tokens).cast<float>()), 2e-5);

  // The biases matter: dropping them changes the output.
  ModelWeights nb = w;
  for (auto& blk : nb.blocks) blk.q.b.setZero(), blk.k.b.setZero(), blk.v.b.setZero();
  EXPECT_GT(max_abs_diff(Transformer(nb).forward(tokens), logits), 1e-3);
}

TEST(Transformer, MatchesReferenceMultiHeadAttention) {
  TinySpec s;
  s.kv_heads = s.heads;
  const ModelWeights w = tiny_model(s);
  const auto tokens = random_tokens(21, s.vocab, 3);
  EXPECT_LT(max_abs_diff(Transformer(w).forward(tokens), ref_forward(w, tokens).cast<float>()),
            2e-5);
}

TEST(Transformer, LongWindowSpansSeveralTilesAndMatchesReference) {
  // 300 tokens: two row panels, three attention chunks; vocab 300: three column tiles.
  const ModelWeights w = tiny_model(TinySpec{});
  const auto tokens = random_tokens(300, w.config.vocab_size, 4);
  const Matrix logits = Transformer(w).forward(tokens);
  const MatrixD ref = ref_forward(w, tokens);
  EXPECT_LT(max_abs_diff(logits, ref.cast<float>()), 5e-5);
}

TEST(Transformer, IncrementalEqualsForwardTokenByTokenAndInChunks) {
  TinySpec s;
  s.qkv_bias = true;
  const ModelWeights w = tiny_model(s);
  const Transformer model(w);
  const auto tokens = random_tokens(45, s.vocab, 5);
  const Matrix full = model.forward(tokens);

  Transformer::KvCache cache;
  Matrix steps(tokens.size(), s.vocab);
  for (size_t t = 0; t < tokens.size(); ++t) {
    steps.row(t) = model.forward_incremental({tokens[t]}, cache).row(0);
    EXPECT_EQ(cache.length(), static_cast<int64_t>(t + 1));
  }
  EXPECT_LT(max_abs_diff(steps, full), 1e-5);

  cache.clear();
  EXPECT_EQ(cache.length(), 0);
  Matrix chunked(tokens.size(), s.vocab);
  size_t at = 0;
  for (size_t len : {7, 1, 13, 24}) {
    std::vector<int32_t> part(tokens.begin() + at, tokens.begin() + at + len);
    chunked.middleRows(at, len) = model.forward_incremental(part, cache);
    at += len;
  }
  ASSERT_EQ(at, tokens.size());
  EXPECT_LT(max_abs_diff(chunked, full), 1e-5);
  // The cache holds post-RoPE keys: one block's cache equals the keys a kv hook sees.
  EXPECT_EQ(cache.keys(0).rows(), 45);

  // An empty step is a no-op.
  EXPECT_EQ(model.forward_incremental({}, cache).rows(), 0);
  EXPECT_EQ(cache.length(), 45);
}

TEST(Transformer, BlockPiecesComposeToForwardBitwise) {
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  const auto tokens = random_tokens(50, w.config.vocab_size, 6);
  Matrix h = model.embed(tokens);
  for (int b = 0; b < w.config.num_layers; ++b) h = model.block(b, h);
  EXPECT_TRUE(bitwise_equal(model.head(h), model.forward(tokens)));
}

TEST(Transformer, BlockOverrideEqualsModelWithThoseWeights) {
  const ModelWeights w = tiny_model(TinySpec{});
  ModelWeights w2 = w;
  w2.blocks[1].gate.W *= 0.5f;
  w2.blocks[1].k.W.col(3).setZero();
  const Transformer model(w), model2(w2);
  const auto tokens = random_tokens(30, w.config.vocab_size, 7);
  Matrix h = model.embed(tokens);
  h = model.block(0, h);
  h = model.block(1, h, 0, nullptr, &w2.blocks[1]);
  h = model.block(2, h);
  EXPECT_TRUE(bitwise_equal(model.head(h), model2.forward(tokens)));
  EXPECT_FALSE(bitwise_equal(model.head(h), model.forward(tokens)));

  // pos0 is the position of h's first row: RoPE of block 0's keys uses positions 5, 6, ...
  const Matrix e = model.embed(tokens);
  Matrix pre, post;
  ForwardHooks kv;
  kv.kv = [&](int, KvStage st, Matrix& K, Matrix&) { (st == KvStage::PreRope ? pre : post) = K; };
  model.block(0, e, 5, &kv);
  MatrixD rotated = pre.cast<double>();
  ref_rope(rotated, w.config.num_kv_heads, w.config.head_dim, w.config.rope.theta, 5);
  EXPECT_LT(max_abs_diff(post, rotated.cast<float>()), 2e-5);
  EXPECT_FALSE(bitwise_equal(model.block(0, e, 5), model.block(0, e, 0)));
}

TEST(Transformer, ForwardBatchEqualsForwardBitwise) {
  ThreadGuard guard;
  set_num_threads(2);
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  std::vector<std::vector<int32_t>> windows;
  for (size_t i = 0; i < 5; ++i)
    windows.push_back(random_tokens(std::vector<size_t>{64, 300, 1, 129, 64}[i], 300, 100 + i));
  const std::vector<Matrix> batch = model.forward_batch(windows);
  ASSERT_EQ(batch.size(), windows.size());
  for (size_t i = 0; i < windows.size(); ++i)
    EXPECT_TRUE(bitwise_equal(batch[i], model.forward(windows[i]))) << "window " << i;
  // A single window takes the tile-parallel path: same bits.
  EXPECT_TRUE(bitwise_equal(model.forward_batch({windows[1]})[0], batch[1]));
}

TEST(Transformer, OneAndTwoThreadsGiveIdenticalBits) {
  ThreadGuard guard;
  // Products large enough that a threaded OpenBLAS call would split them (and change bits).
  TinySpec s;
  s.hidden = 256, s.heads = 8, s.kv_heads = 4, s.head_dim = 32, s.inter = 768, s.vocab = 512;
  s.layers = 2;
  s.qkv_bias = true;
  const ModelWeights w = tiny_model(s);
  const Transformer model(w);
  const auto tokens = random_tokens(300, s.vocab, 8);
  const auto short_window = random_tokens(9, s.vocab, 12);  // below the parallel threshold
  std::vector<std::vector<int32_t>> windows = {random_tokens(100, s.vocab, 9), tokens,
                                               random_tokens(77, s.vocab, 10), short_window};
  struct Run {
    Matrix full, short_full, inc;
    std::vector<Matrix> batch;
  };
  auto run = [&] {
    Run r;
    r.full = model.forward(tokens);
    r.short_full = model.forward(short_window);
    r.batch = model.forward_batch(windows);
    Transformer::KvCache cache;
    model.forward_incremental(std::vector<int32_t>(tokens.begin(), tokens.begin() + 40), cache);
    r.inc = model.forward_incremental({tokens[40]}, cache);
    return r;
  };
  set_num_threads(1);
  const Run one = run();
  set_num_threads(2);
  const Run two = run();
  EXPECT_TRUE(bitwise_equal(one.full, two.full));
  EXPECT_TRUE(bitwise_equal(one.short_full, two.short_full));
  EXPECT_TRUE(bitwise_equal(one.inc, two.inc));
  for (size_t i = 0; i < windows.size(); ++i)
    EXPECT_TRUE(bitwise_equal(one.batch[i], two.batch[i])) << "window " << i;
  EXPECT_TRUE(bitwise_equal(two.batch[1], one.full));
  EXPECT_TRUE(bitwise_equal(two.batch[3], one.short_full));
}

TEST(Transformer, CaptureInputSeesEveryLinearWithTheRightShapesAndValues) {
  const ModelWeights w = tiny_model(TinySpec{});
  const ModelConfig& c = w.config;
  const Transformer model(w);
  const auto tokens = random_tokens(23, c.vocab_size, 11);
  std::map<std::pair<int, int>, Matrix> seen;
  ForwardHooks hooks;
  hooks.capture_input = [&](int b, LinearKind k, const Matrix& X) {
    EXPECT_TRUE(seen.emplace(std::make_pair(b, int(k)), X).second) << linear_name(b, k);
  };
  const Matrix logits = model.forward(tokens, &hooks);
  auto X = [&](int b, LinearKind k) -> const Matrix& { return seen[std::make_pair(b, int(k))]; };
  EXPECT_TRUE(bitwise_equal(logits, model.forward(tokens)));  // capturing changes nothing
  ASSERT_EQ(seen.size(), size_t(c.num_layers * kLinearKinds));
  for (int b = 0; b < c.num_layers; ++b) {
    for (LinearKind k :
         {LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::Gate, LinearKind::Up}) {
      EXPECT_EQ(X(b, k).rows(), 23);
      EXPECT_EQ(X(b, k).cols(), c.hidden_size) << linear_name(b, k);
    }
    EXPECT_EQ(X(b, LinearKind::O).cols(), c.num_heads * c.head_dim);
    EXPECT_EQ(X(b, LinearKind::Down).cols(), c.intermediate_size);
  }
  // Block 0's q_proj input is RMSNorm(embedding rows) ⊙ input_norm.
  MatrixD e(23, c.hidden_size);
  for (Index t = 0; t < 23; ++t) e.row(t) = w.embed.row(tokens[t]).cast<double>();
  const MatrixD x0 = ref_rms_norm(e, w.blocks[0].input_norm, c.rms_norm_eps);
  EXPECT_LT(max_abs_diff(X(0, LinearKind::Q), x0.cast<float>()), 1e-5);
  // Gate and Up read the same normed activations.
  EXPECT_TRUE(bitwise_equal(X(1, LinearKind::Gate), X(1, LinearKind::Up)));
  // Down's input is silu(gate) ⊙ up of its block.
  const Matrix& xg = X(2, LinearKind::Gate);
  MatrixD act = ref_linear(xg.cast<double>(), w.blocks[2].gate);
  const MatrixD up = ref_linear(xg.cast<double>(), w.blocks[2].up);
  for (Index i = 0; i < act.size(); ++i)
    act.data()[i] = act.data()[i] / (1 + std::exp(-act.data()[i])) * up.data()[i];
  EXPECT_LT(max_abs_diff(X(2, LinearKind::Down), act.cast<float>()), 1e-5);
}

TEST(Transformer, TransformInputIdentityIsExactAndZeroingChangesOutput) {
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  const auto tokens = random_tokens(40, w.config.vocab_size, 12);
  const Matrix base = model.forward(tokens);

  ForwardHooks identity;
  int calls = 0;
  identity.transform_input = [&](int, LinearKind, Matrix&) { ++calls; };
  EXPECT_TRUE(bitwise_equal(model.forward(tokens, &identity), base));
  EXPECT_EQ(calls, w.config.num_layers * kLinearKinds);

  // Zeroing q_proj's input of block 0: capture sees the zeros, k_proj's input is untouched,
  // and the logits change.
  ForwardHooks zero_q;
  Matrix seen_q, seen_k;
  zero_q.transform_input = [](int b, LinearKind k, Matrix& X) {
    if (b == 0 && k == LinearKind::Q) X.setZero();
  };
  zero_q.capture_input = [&](int b, LinearKind k, const Matrix& X) {
    if (b == 0 && k == LinearKind::Q) seen_q = X;
    if (b == 0 && k == LinearKind::K) seen_k = X;
  };
  const Matrix changed = model.forward(tokens, &zero_q);
  EXPECT_EQ(seen_q.cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_GT(seen_k.cwiseAbs().maxCoeff(), 0.1f);
  EXPECT_GT(max_abs_diff(changed, base), 1e-3);

  // Zeroing down_proj's input of the last block removes that MLP: same as zero down weights.
  ForwardHooks zero_down;
  zero_down.transform_input = [&](int b, LinearKind k, Matrix& X) {
    if (b == w.config.num_layers - 1 && k == LinearKind::Down) X.setZero();
  };
  ModelWeights w2 = w;
  w2.blocks.back().down.W.setZero();
  EXPECT_TRUE(bitwise_equal(model.forward(tokens, &zero_down), Transformer(w2).forward(tokens)));
}

TEST(Transformer, KvHookPostRopeIsRopeOfPreRope) {
  const ModelWeights w = tiny_model(TinySpec{});
  const ModelConfig& c = w.config;
  const Transformer model(w);
  const auto tokens = random_tokens(33, c.vocab_size, 13);
  std::map<std::pair<int, int>, std::pair<Matrix, Matrix>> kv;
  Matrix xk0;
  ForwardHooks hooks;
  hooks.kv = [&](int b, KvStage st, Matrix& K, Matrix& V) {
    kv[std::make_pair(b, int(st))] = {K, V};
  };
  hooks.capture_input = [&](int b, LinearKind k, const Matrix& X) {
    if (b == 0 && k == LinearKind::K) xk0 = X;
  };
  EXPECT_TRUE(bitwise_equal(model.forward(tokens, &hooks), model.forward(tokens)));
  ASSERT_EQ(kv.size(), size_t(2 * c.num_layers));
  for (int b = 0; b < c.num_layers; ++b) {
    const auto& pre = kv[std::make_pair(b, int(KvStage::PreRope))];
    const auto& post = kv[std::make_pair(b, int(KvStage::PostRope))];
    ASSERT_EQ(pre.first.rows(), 33);
    ASSERT_EQ(pre.first.cols(), c.num_kv_heads * c.head_dim);
    EXPECT_TRUE(bitwise_equal(pre.second, post.second));  // V is not rotated
    MatrixD rotated = pre.first.cast<double>();
    ref_rope(rotated, c.num_kv_heads, c.head_dim, c.rope.theta, 0);
    EXPECT_LT(max_abs_diff(post.first, rotated.cast<float>()), 2e-5) << "block " << b;
    EXPECT_GT(max_abs_diff(post.first, pre.first), 1e-2);  // RoPE did something
  }
  // Pre-RoPE K is k_proj applied to its input.
  EXPECT_LT(max_abs_diff(kv[std::make_pair(0, int(KvStage::PreRope))].first,
                         ref_linear(xk0.cast<double>(), w.blocks[0].k).cast<float>()),
            1e-5);

  // The cache stores post-RoPE keys: incremental decoding of the same tokens holds them.
  Transformer::KvCache cache;
  model.forward_incremental(tokens, cache);
  EXPECT_TRUE(
      bitwise_equal(Matrix(cache.keys(1)), kv[std::make_pair(1, int(KvStage::PostRope))].first));
}

TEST(Transformer, KvHookSubstitutionIsUsedByAttentionAndCache) {
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  const auto tokens = random_tokens(26, w.config.vocab_size, 14);
  const Matrix base = model.forward(tokens);

  // V := 0 in block 1 equals a model whose v_proj of block 1 is zero.
  for (KvStage stage : {KvStage::PreRope, KvStage::PostRope}) {
    ForwardHooks zero_v;
    zero_v.kv = [stage](int b, KvStage st, Matrix&, Matrix& V) {
      if (b == 1 && st == stage) V.setZero();
    };
    ModelWeights w2 = w;
    w2.blocks[1].v.W.setZero();
    const Matrix out = model.forward(tokens, &zero_v);
    EXPECT_GT(max_abs_diff(out, base), 1e-3);
    EXPECT_TRUE(bitwise_equal(out, Transformer(w2).forward(tokens)));

    // The same substitution through the KV cache.
    Transformer::KvCache cache;
    Matrix inc(tokens.size(), w.config.vocab_size);
    for (size_t t = 0; t < tokens.size(); ++t)
      inc.row(t) = model.forward_incremental({tokens[t]}, cache, &zero_v).row(0);
    EXPECT_LT(max_abs_diff(inc, out), 1e-5);
    EXPECT_EQ(cache.values(1).cwiseAbs().maxCoeff(), 0.0f);
  }

  // Substituting pre-RoPE K with K scaled by 2 in every block changes the output.
  ForwardHooks scale_k;
  scale_k.kv = [](int, KvStage st, Matrix& K, Matrix&) {
    if (st == KvStage::PreRope) K *= 2.0f;
  };
  EXPECT_GT(max_abs_diff(model.forward(tokens, &scale_k), base), 1e-3);
}

TEST(Transformer, PerWindowHooksInBatch) {
  ThreadGuard guard;
  set_num_threads(2);
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  std::vector<std::vector<int32_t>> windows;
  for (int i = 0; i < 4; ++i) windows.push_back(random_tokens(20 + 10 * i, 300, 200 + i));
  std::vector<Matrix> captured(windows.size());
  std::vector<ForwardHooks> hooks(windows.size());
  for (size_t i = 0; i < windows.size(); ++i) {
    hooks[i].capture_input = [&captured, i](int b, LinearKind k, const Matrix& X) {
      if (b == 2 && k == LinearKind::Down) captured[i] = X;  // per-window slot, no lock
    };
    // Window 3 drops block 0's attention values: only its logits differ.
    if (i == 3)
      hooks[i].kv = [](int b, KvStage st, Matrix&, Matrix& V) {
        if (b == 0 && st == KvStage::PostRope) V.setZero();
      };
  }
  const auto out = model.forward_batch(windows, hooks);
  for (size_t i = 0; i < windows.size(); ++i) {
    Matrix single_capture;
    ForwardHooks h = hooks[i];
    h.capture_input = [&](int b, LinearKind k, const Matrix& X) {
      if (b == 2 && k == LinearKind::Down) single_capture = X;
    };
    EXPECT_TRUE(bitwise_equal(out[i], model.forward(windows[i], &h))) << i;
    EXPECT_TRUE(bitwise_equal(captured[i], single_capture)) << i;
  }
  EXPECT_FALSE(bitwise_equal(out[3], model.forward(windows[3])));

  // A shared thread-safe hook sees every window.
  std::mutex mu;
  long rows = 0;
  ForwardHooks shared;
  shared.capture_input = [&](int b, LinearKind k, const Matrix& X) {
    if (b == 0 && k == LinearKind::Q) {
      std::lock_guard<std::mutex> lock(mu);
      rows += X.rows();
    }
  };
  model.forward_batch(windows, &shared);
  EXPECT_EQ(rows, 20 + 30 + 40 + 50);
}

TEST(Transformer, BlockBatchEqualsBlockPerWindowForAnyThreadCount) {
  ThreadGuard guard;
  const ModelWeights w = tiny_model(TinySpec{});
  ModelWeights w2 = w;
  w2.blocks[1].up.W *= 0.75f;
  const Transformer model(w);
  std::vector<Matrix> h;
  for (int i = 0; i < 5; ++i) h.push_back(model.embed(random_tokens(std::vector<size_t>{40, 17, 64, 1, 33}[i], 300, 300 + i)));
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (size_t n : {size_t{1}, size_t{5}}) {  // 1 < threads: tile-parallel; 5: windows spread
      std::vector<Matrix> out(h.begin(), h.begin() + static_cast<long>(n));
      std::vector<Matrix*> io;
      for (auto& m : out) io.push_back(&m);
      std::vector<Matrix> captured(n);
      std::vector<ForwardHooks> hooks(n);
      for (size_t i = 0; i < n; ++i)
        hooks[i].capture_input = [&captured, i](int, LinearKind k, const Matrix& X) {
          if (k == LinearKind::Down) captured[i] = X;
        };
      model.block_batch(1, io, hooks, &w2.blocks[1]);
      for (size_t i = 0; i < n; ++i) {
        Matrix single;
        ForwardHooks one;
        one.capture_input = [&](int, LinearKind k, const Matrix& X) {
          if (k == LinearKind::Down) single = X;
        };
        EXPECT_TRUE(bitwise_equal(out[i], model.block(1, h[i], 0, &one, &w2.blocks[1]))) << threads << " " << i;
        EXPECT_TRUE(bitwise_equal(captured[i], single)) << threads << " " << i;
      }
    }
  }
  std::vector<Matrix*> io{&h[0]};
  EXPECT_THROW(model.block_batch(0, io, {}), ShapeError);
}

TEST(Transformer, StagedBlockEqualsBlockAndSeesEachGroupsWeightsAsTheyAreWhenItRuns) {
  ThreadGuard guard;
  const ModelWeights w = tiny_model(TinySpec{});
  ModelWeights w2 = w;  // every group changed, as true-sequential quantization changes them;
  // the norms too, as a smoothing step folds scales into them just before their group
  w2.blocks[1].input_norm *= 0.8f;
  w2.blocks[1].post_attn_norm *= 1.5f;
  w2.blocks[1].q.W *= 0.5f;
  w2.blocks[1].o.W *= -0.75f;
  w2.blocks[1].up.W *= 1.25f;
  w2.blocks[1].down.W.col(2).setZero();
  const Transformer model(w), model2(w2);
  std::vector<Matrix> h;
  for (int i = 0; i < 3; ++i) h.push_back(model.embed(random_tokens(std::vector<size_t>{40, 9, 70}[i], 300, 400 + i)));
  // An input transform (scales one channel of every linear's input) and a capture per window.
  auto hooks_for = [](std::map<int, Matrix>& seen) {
    ForwardHooks f;
    f.transform_input = [](int, LinearKind k, Matrix& X) { X.col(1) *= 1.0f + static_cast<float>(k); };
    f.capture_input = [&seen](int, LinearKind k, const Matrix& X) { seen[static_cast<int>(k)] = X; };
    return f;
  };
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    ModelWeights staged_w = w;  // group g takes w2's weights just before stage g runs
    const Transformer staged_model(staged_w);
    std::vector<BlockStageState> st(h.size());
    std::vector<BlockStageState*> ptr;
    std::vector<std::map<int, Matrix>> seen(h.size()), seen_inputs(h.size());
    std::vector<ForwardHooks> hooks, input_hooks;
    for (size_t i = 0; i < h.size(); ++i) {
      staged_model.block_stage_begin(1, h[i], st[i]);
      ptr.push_back(&st[i]);
      hooks.push_back(hooks_for(seen[i]));
      input_hooks.push_back(hooks_for(seen_inputs[i]));
    }
    const LinearKind first[4] = {LinearKind::Q, LinearKind::O, LinearKind::Gate, LinearKind::Down};
    const std::vector<std::vector<LinearKind>> members = {
        {LinearKind::Q, LinearKind::K, LinearKind::V}, {LinearKind::O}, {LinearKind::Gate, LinearKind::Up}, {LinearKind::Down}};
    for (int g = 0; g < kBlockStages; ++g) {
      for (LinearKind k : members[g]) staged_w.blocks[1].linear(k).W = w2.blocks[1].linear(k).W;
      if (g == 0) staged_w.blocks[1].input_norm = w2.blocks[1].input_norm;
      if (g == 2) staged_w.blocks[1].post_attn_norm = w2.blocks[1].post_attn_norm;
      staged_model.block_stage_inputs(1, g, ptr, input_hooks);
      staged_model.block_stage(1, g, ptr, hooks);
      for (size_t i = 0; i < h.size(); ++i)  // what the stage's first linear multiplied
        EXPECT_TRUE(bitwise_equal(seen_inputs[i].at(static_cast<int>(first[g])), seen[i].at(static_cast<int>(first[g]))));
    }
    for (size_t i = 0; i < h.size(); ++i) {
      std::map<int, Matrix> ref_seen;
      const ForwardHooks ref = hooks_for(ref_seen);
      EXPECT_TRUE(bitwise_equal(st[i].h, model2.block(1, h[i], 0, &ref))) << threads << " " << i;
      EXPECT_EQ(st[i].stage, kBlockStages);
      for (auto& [k, X] : ref_seen) EXPECT_TRUE(bitwise_equal(seen[i].at(k), X)) << "linear " << k;
    }
    // Stages run out of order are refused.
    EXPECT_THROW(staged_model.block_stage(1, 0, ptr, hooks), ShapeError);
  }
}

TEST(Transformer, ErrorsAreClear) {
  const ModelWeights w = tiny_model(TinySpec{});
  const Transformer model(w);
  try {
    model.forward({1, 2, 300});
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("token id 300 at position 2"), std::string::npos)
        << e.what();
  }
  // An error in one window of a batch surfaces after the parallel region.
  EXPECT_THROW(model.forward_batch({{1, 2}, {3, -1}, {4}}), ShapeError);

  ModelWeights bad = w;
  bad.blocks[2].up.W.resize(10, 64);
  try {
    Transformer t(bad);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.2.mlp.up_proj.weight is 10x64"),
              std::string::npos)
        << e.what();
  }
  ForwardHooks reshape;
  reshape.transform_input = [](int, LinearKind, Matrix& X) { X.resize(1, 1); };
  EXPECT_THROW(model.forward({1, 2}, &reshape), ShapeError);
  ForwardHooks reshape_kv;
  reshape_kv.kv = [](int, KvStage, Matrix& K, Matrix&) { K.resize(1, 1); };
  EXPECT_THROW(model.forward({1, 2}, &reshape_kv), ShapeError);

  // A failed incremental step leaves the cache as it was.
  Transformer::KvCache cache;
  model.forward_incremental({1, 2, 3}, cache);
  EXPECT_THROW(model.forward_incremental({4, 999}, cache), ShapeError);
  ForwardHooks throwing;
  throwing.kv = [](int b, KvStage, Matrix&, Matrix&) {
    if (b == 2) throw NumericError("hook failure");
  };
  EXPECT_THROW(model.forward_incremental({4, 5}, cache, &throwing), NumericError);
  EXPECT_EQ(cache.length(), 3);
  const Matrix next = model.forward_incremental({4}, cache);
  EXPECT_LT(max_abs_diff(next.row(0), model.forward({1, 2, 3, 4}).row(3)), 1e-5);
}

// ---- golden logits of the real checkpoint ----

TEST(TransformerGolden, LogitsFirst64MatchReference) {
  const std::string dir = std::string(QL_SHARED_DATA_DIR) + "/austen-llama-7m";
  if (!std::filesystem::exists(dir + "/model.safetensors"))
    GTEST_SKIP() << "../shared/data not found at " << QL_SHARED_DATA_DIR;
  std::ifstream gj(dir + "/golden/golden.json");
  const nlohmann::json golden = nlohmann::json::parse(gj);
  const auto& ref = golden.at("logits_first64");
  const std::vector<int32_t> tokens = ref.at("token_ids").get<std::vector<int32_t>>();
  const int64_t rows = ref.at("shape")[0], cols = ref.at("shape")[1];
  ASSERT_EQ(static_cast<int64_t>(tokens.size()), rows);
  Matrix expected(rows, cols);
  std::ifstream bin(dir + "/golden/" + ref.at("file").get<std::string>(), std::ios::binary);
  bin.read(reinterpret_cast<char*>(expected.data()), sizeof(float) * expected.size());
  ASSERT_TRUE(bin.good()) << "short read of logits_first64.f32";

  const ModelWeights w = load_checkpoint(dir);
  const Transformer model(w);
  const Matrix logits = model.forward(tokens);
  const float diff = max_abs_diff(logits, expected);
  std::printf("[golden] logits_first64 max abs diff = %.3g\n", diff);
  EXPECT_LT(diff, 1e-4);

  // The other paths agree on the real model too.
  EXPECT_TRUE(bitwise_equal(model.forward_batch({tokens, tokens})[1], logits));
  Transformer::KvCache cache;
  Matrix inc(rows, cols);
  for (int64_t t = 0; t < rows; ++t) inc.row(t) = model.forward_incremental({tokens[t]}, cache);
  const float inc_diff = max_abs_diff(inc, expected);
  std::printf("[golden] incremental decoding max abs diff = %.3g\n", inc_diff);
  EXPECT_LT(inc_diff, 1e-4);
}

// ---- the architecture table and the quantized-model object ----

TEST(Architecture, TableCoversEveryLinearOnceWithItsInputWidth) {
  TinySpec s;
  const ModelWeights w = tiny_model(s);
  const Architecture a = Architecture::of(w.config);
  std::array<int, kLinearKinds> seen{};
  for (std::size_t g = 0; g < a.input_groups().size(); ++g)
    for (LinearKind k : a.input_groups()[g].members) {
      ++seen[static_cast<int>(k)];
      EXPECT_EQ(a.group_of(k), static_cast<int>(g));
      EXPECT_EQ(w.blocks[0].linear(k).W.cols(), a.input_width(static_cast<int>(g))) << linear_name(0, k);
    }
  for (int k = 0; k < kLinearKinds; ++k) EXPECT_EQ(seen[k], 1);
  // Norm-produced groups: q/k/v after input_layernorm, gate/up after post_attention_layernorm.
  EXPECT_EQ(a.norm_name(2, a.group_of(LinearKind::K)), "model.layers.2.input_layernorm");
  EXPECT_EQ(a.norm_name(2, a.group_of(LinearKind::Up)), "model.layers.2.post_attention_layernorm");
  EXPECT_EQ(a.norm_name(2, a.group_of(LinearKind::O)), "");
  EXPECT_EQ(a.heads().kv_head_of(3), 1);  // 4 heads on 2 kv heads
  EXPECT_EQ(a.heads().kv_dim(), Index(s.kv_heads) * s.head_dim);
  for (int i = 0; i < s.head_dim; ++i) {
    EXPECT_EQ(a.rope().partner(a.rope().partner(i)), i);
    EXPECT_EQ(std::abs(a.rope().partner(i) - i), s.head_dim / 2);
  }
  for (const TransformSlotInfo& slot : a.transform_slots()) EXPECT_EQ(&a.slot(slot.slot), &slot);
  ModelConfig other = w.config;
  other.architecture = "GPTNeoXForCausalLM";
  try {
    Architecture::of(other);
    FAIL() << "expected a ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("GPTNeoXForCausalLM"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("LlamaForCausalLM"), std::string::npos);
  }
}

TEST(QuantizedModel, WithoutQuantizersItEvaluatesBitwiseAsTheFpModel) {
  TinySpec s;
  auto fp = std::make_shared<const ModelWeights>(tiny_model(s));
  QuantizedModel qm(fp);
  EXPECT_FALSE(qm.has_activation_quant());
  const auto tokens = random_tokens(40, s.vocab, 5);
  const Matrix ref = Transformer(*fp).forward(tokens);
  const ForwardHooks hooks = qm.hooks();
  EXPECT_TRUE(bitwise_equal(Transformer(qm.current()).forward(tokens, &hooks), ref));

  // An active per-token 4-bit quantizer at one linear is what a hand-written hook does there.
  ActQuantSpec a4;
  a4.bits = 4;
  a4.granularity = ActGranularity::PerToken;
  qm.act(1, LinearKind::Down).spec = &a4;
  EXPECT_TRUE(qm.has_activation_quant());
  ForwardHooks manual;
  manual.transform_input = [&](int b, LinearKind k, Matrix& X) {
    if (b == 1 && k == LinearKind::Down) fake_quant_activations(X, a4);
  };
  const ForwardHooks qh = qm.hooks();
  const Matrix q = Transformer(qm.current()).forward(tokens, &qh);
  EXPECT_TRUE(bitwise_equal(q, Transformer(*fp).forward(tokens, &manual)));
  EXPECT_FALSE(bitwise_equal(q, ref));
  // The FP weights are never touched by edits of the current ones.
  qm.block(0).q.W.setZero();
  EXPECT_NE(qm.fp_block(0).q.W.norm(), 0.0f);
}

// ---- a quantized KV cache in attention ----

struct KvCase {
  const char* name;
  ScalarKvSpec spec;
};

std::vector<KvCase> kv_cases() {
  std::vector<KvCase> v;
  ScalarKvSpec a;  // FlatQuant's setting: per token, one group per head, R = 0
  a.key_bits = a.value_bits = 3;
  v.push_back({"token_head_R0", a});
  ScalarKvSpec b;  // KIVI: keys per channel over 8-token chunks, 5 exact recent tokens
  b.key_bits = b.value_bits = 2;
  b.keys_per_channel = true;
  b.token_group = 8;
  b.residual_length = 5;
  b.group_size = 8;
  v.push_back({"kivi_channel8_R5", b});
  ScalarKvSpec c;  // pre-RoPE keys (KVQuant), per-token groups of the whole row, R = 3
  c.key_bits = 4;
  c.value_bits = 2;
  c.key_stage = KvStage::PreRope;
  c.group_size = 32;
  c.residual_length = 3;
  v.push_back({"prerope_row_R3", c});
  return v;
}

ForwardHooks kv_hooks(const KvQuantizer* q) {
  ForwardHooks h;
  h.kv_quantizer = [q](int) { return q; };
  return h;
}

TEST(KvCacheQuant, WindowedAndIncrementalAgreeAndTheCacheHoldsCodesOfTheStatedSize) {
  TinySpec s;
  const ModelWeights w = tiny_model(s);
  const Transformer tf(w);
  const Index kvd = Index(s.kv_heads) * s.head_dim;
  const auto tokens = random_tokens(45, s.vocab, 9);
  const Matrix fp = tf.forward(tokens);
  for (const KvCase& kc : kv_cases()) {
    SCOPED_TRACE(kc.name);
    const auto q = make_scalar_kv_quantizer(kc.spec, s.head_dim, kvd);
    const ForwardHooks h = kv_hooks(q.get());
    const Matrix win = tf.forward(tokens, &h);
    EXPECT_GT(max_abs_diff(win, fp), 1e-3f);  // the cache is quantized
    // Token by token, then in uneven pieces: the same read rule, other product shapes.
    for (int piece : {1, 7}) {
      Transformer::KvCache cache;
      Matrix inc(static_cast<Index>(tokens.size()), s.vocab);
      for (std::size_t t0 = 0; t0 < tokens.size(); t0 += piece) {
        const std::size_t t1 = std::min(tokens.size(), t0 + piece);
        const std::vector<int32_t> part(tokens.begin() + t0, tokens.begin() + t1);
        inc.middleRows(static_cast<Index>(t0), static_cast<Index>(t1 - t0)) = tf.forward_incremental(part, cache, &h);
      }
      EXPECT_LT(max_abs_diff(inc, win), 1e-5f * (1.0f + win.cwiseAbs().maxCoeff())) << "piece " << piece;
      for (int b = 0; b < s.layers; ++b) EXPECT_EQ(cache.bytes(b), q->cache_bytes(cache.length(), kvd));
      EXPECT_GT(cache.encoded_keys(0), 0);
    }
  }
}

TEST(KvCacheQuant, AResidualWindowCoveringTheWindowIsTheFpModelExactly) {
  TinySpec s;
  const ModelWeights w = tiny_model(s);
  const Transformer tf(w);
  const auto tokens = random_tokens(40, s.vocab, 10);
  ScalarKvSpec spec;
  spec.key_bits = spec.value_bits = 2;
  spec.residual_length = 40;
  const auto q = make_scalar_kv_quantizer(spec, s.head_dim, Index(s.kv_heads) * s.head_dim);
  const ForwardHooks h = kv_hooks(q.get());
  EXPECT_TRUE(bitwise_equal(tf.forward(tokens, &h), tf.forward(tokens)));
}

TEST(KvCacheQuant, CacheBytesFollowTheFormula) {
  // 64 kv channels, per-token groups of 16: a quantized token costs 64*4/8 + 4 grids * 4 bytes.
  ScalarKvSpec spec;
  spec.group_size = 16;
  spec.residual_length = 10;
  const auto q = make_scalar_kv_quantizer(spec, 16, 64);
  const int64_t n = 100, enc = 91;  // exact_from(100, 1, 10) = 91
  EXPECT_EQ(q->cache_bytes(n, 64), 2 * (enc * (32 + 16) + (n - enc) * 128));
  EXPECT_NEAR(q->kv_bits(n, 64), 8.0 * q->cache_bytes(n, 64) / (2.0 * n * 64), 1e-12);
  EXPECT_NEAR(q->bits_per_element(KvKind::Key, 64), 4 + 32.0 / 16, 1e-12);
  EXPECT_EQ(kv_exact_from(9, 8, 0), 8);
  EXPECT_EQ(kv_exact_from(6, 8, 0), 0);
  EXPECT_EQ(kv_exact_from(20, 8, 5), 16);
  EXPECT_THROW(make_scalar_kv_quantizer(spec, 16, 60), ShapeError);  // 16 does not divide 60
}

// Learned clipping (FlatQuant's KV LAC) scales each per-token grid's range: with ratios r the
// grid is the plain grid of [lo·r_lo, hi·r_hi], values beyond it clamp to its ends, and the
// ratios apply to keys and values separately. Per-channel keys refuse key clipping.
TEST(KvCacheQuant, LearnedClippingScalesEachTokensRange) {
  ScalarKvSpec spec;
  spec.key_bits = spec.value_bits = 4;
  spec.key_clip = ActClip{0.5f, 0.75f};
  const auto q = make_scalar_kv_quantizer(spec, 8, 8);
  const auto plain = make_scalar_kv_quantizer(ScalarKvSpec{}, 8, 8);
  Matrix X(2, 8);
  X << -4, -1, 0, 0.5, 1, 2, 3, 8, -2, -0.5, 0.25, 0.75, 1.5, 2.5, 3.5, 6;
  Matrix K = X, V = X;
  q->fake_quant_complete_chunks(KvKind::Key, K);
  q->fake_quant_complete_chunks(KvKind::Value, V);
  Matrix Vp = X;
  plain->fake_quant_complete_chunks(KvKind::Value, Vp);
  EXPECT_EQ(V, Vp) << "values keep their plain grid";
  QuantSpec g;
  g.bits = 4;
  g.scheme = QuantScheme::Asym;
  g.granularity = Granularity::PerTensor;
  g.scale_dtype = ScaleDtype::F32;
  for (Index r = 0; r < 2; ++r) {
    const float lo = X.row(r).minCoeff() * 0.5f, hi = X.row(r).maxCoeff() * 0.75f;
    const Grid grid = grid_from_range(lo, hi, g);
    for (Index j = 0; j < 8; ++j)
      EXPECT_EQ(K(r, j), dequantize_value(quantize_value(X(r, j), grid), grid)) << r << "," << j;
    EXPECT_LT(K.row(r).maxCoeff(), X.row(r).maxCoeff());  // the clipped maximum
  }
  EXPECT_NE(q->describe().find("learned key clip [0.5000, 0.7500]"), std::string::npos) << q->describe();
  spec.keys_per_channel = true;
  EXPECT_THROW(make_scalar_kv_quantizer(spec, 8, 8), ShapeError);
  spec.keys_per_channel = false;
  spec.value_clip = ActClip{0.0f, 1.0f};
  EXPECT_THROW(make_scalar_kv_quantizer(spec, 8, 8), ShapeError);
}

// ---- transforms in the forward pass ----

TransformFactor random_factor(Index n, uint64_t stream) {
  // A general invertible factor: orthogonal times a positive diagonal (FlatQuant's SVD form).
  MatrixD Q = random_orthogonal(n, 5, stream);
  VectorD sigma(n);
  for (Index i = 0; i < n; ++i) sigma[i] = 0.5 + static_cast<double>(i) / static_cast<double>(n);
  return TransformFactor{Q * sigma.asDiagonal(), Q * sigma.cwiseInverse().asDiagonal()};
}

TEST(Transforms, EveryStructureAppliesItsMatrixAndMergesExactly) {
  const std::vector<InputTransform> ts = {
      InputTransform::dense(random_factor(24, 1)),
      InputTransform::kronecker(random_factor(4, 2), random_factor(6, 3)),
      InputTransform::per_head(random_factor(8, 4), 3),
      InputTransform::across_heads(random_factor(3, 5), 8)};
  for (const InputTransform& t : ts) {
    SCOPED_TRACE(t.describe());
    ASSERT_EQ(t.width(), 24);
    const Matrix X = random_matrix(5, 24, 1.0, 40);
    Matrix Y = X;
    t.apply(Y);
    const MatrixD ref = X.cast<double>() * t.matrix();
    EXPECT_LT((Y.cast<double>() - ref).norm(), 1e-5 * ref.norm());
    EXPECT_LT(t.inverse_error(), 1e-12);
    EXPECT_LT((t.matrix() * t.inverse_transpose().transpose() - MatrixD::Identity(24, 24)).cwiseAbs().maxCoeff(), 1e-12);
    // A linear reading the transformed input keeps its output: (X P)(W P⁻ᵀ)ᵀ = X Wᵀ.
    const Matrix W = random_matrix(7, 24, 0.3, 41);
    Matrix Wm = W;
    merge_input_transform(Wm, t);
    const MatrixD out = (X.cast<double>() * t.matrix()) * Wm.cast<double>().transpose();
    const MatrixD want = X.cast<double>() * W.cast<double>().transpose();
    EXPECT_LT((out - want).norm(), 1e-6 * want.norm());
  }
  EXPECT_EQ(kronecker_factor_sizes(256), (std::pair<Index, Index>{16, 16}));
  EXPECT_EQ(kronecker_factor_sizes(768), (std::pair<Index, Index>{24, 32}));
  const MatrixD H = random_hadamard(16, 1, 2);
  EXPECT_LT((H * H.transpose() - MatrixD::Identity(16, 16)).cwiseAbs().maxCoeff(), 1e-15);
  EXPECT_THROW(random_hadamard(24, 1, 2), ShapeError);
}

TEST(QuantizedModel, RotationInEverySlotLeavesTheFpFunctionUnchanged) {
  TinySpec s;
  s.qkv_bias = true;  // Qwen2-style biases move with P_v
  auto fp = std::make_shared<const ModelWeights>(tiny_model(s));
  const auto tokens = random_tokens(48, s.vocab, 12);
  const Matrix ref = Transformer(*fp).forward(tokens);
  const AlgorithmInfo& info = default_registry().get("rotation");
  for (int seed : {0, 1, 7}) {
    SCOPED_TRACE(seed);
    QuantizedModel qm(fp);
    ConfigNode opts = ConfigNode::parse("seed: " + std::to_string(seed) + "\nkeys: on\n", "rotation.yaml");
    std::any o = info.options->defaults();
    for (const auto& [k, v] : opts.entries()) info.options->parse_key(o, k, v, k);
    const auto rot = info.create(o);
    for (int b = 0; b < s.layers; ++b) {
      BlockInput in;
      in.block = b;
      in.name = "model.layers." + std::to_string(b);
      in.arch = &qm.architecture();
      in.config = &qm.config();
      in.weights = &qm.block(b);
      const BlockResult r = dynamic_cast<const BlockAlgorithm&>(*rot).run(in);
      ASSERT_TRUE(r.transforms[TransformSlot::KeysPerHead]);
      qm.apply_transforms(b, r.transforms);
      // Mapped back through the transforms, every weight is the FP weight.
      for (int k = 0; k < kLinearKinds; ++k) {
        const LinearKind kind = static_cast<LinearKind>(k);
        const Matrix back = qm.effective_weight(b, kind, qm.block(b).linear(kind).W);
        EXPECT_LT(max_abs_diff(back, fp->blocks[b].linear(kind).W), 1e-5f) << linear_name(b, kind);
      }
      EXPECT_THROW(qm.apply_transforms(b, r.transforms), ShapeError);  // one transform per slot
    }
    const ForwardHooks h = qm.hooks();
    const Matrix out = Transformer(qm.current()).forward(tokens, &h);
    EXPECT_LT(max_abs_diff(out, ref), 1e-4f * ref.cwiseAbs().maxCoeff());
    // With keys rotated, windowed and incremental decoding still agree.
    Transformer::KvCache cache;
    Matrix inc(48, s.vocab);
    for (Index t = 0; t < 48; t += 16)
      inc.middleRows(t, 16) = Transformer(qm.current()).forward_incremental(
          std::vector<int32_t>(tokens.begin() + t, tokens.begin() + t + 16), cache, &h);
    EXPECT_LT(max_abs_diff(inc, out), 1e-4f * ref.cwiseAbs().maxCoeff());
  }
}

// FlatQuant's channel scales (x ↦ (x ⊙ c) P) fold where the architecture table says the input
// is produced: into input_layernorm / post_attention_layernorm (γ ⊙ c) and into up_proj's rows
// for the down input; o_proj's input has no producer to fold into, so its scale stays online.
// The model's function is unchanged and every weight maps back to the FP weight.
TEST(QuantizedModel, ChannelScalesFoldIntoTheNormsAndUpProj) {
  TinySpec s;
  auto fp = std::make_shared<const ModelWeights>(tiny_model(s));
  const auto tokens = random_tokens(48, s.vocab, 13);
  const Matrix ref = Transformer(*fp).forward(tokens);
  QuantizedModel qm(fp);
  const ConfigNode opts = ConfigNode::parse("seed: 3\n", "rotation.yaml");
  const AlgorithmInfo& info = default_registry().get("rotation");
  std::any o = info.options->defaults();
  for (const auto& [k, v] : opts.entries()) info.options->parse_key(o, k, v, k);
  const auto rot = info.create(o);
  auto scale = [](Index n, uint64_t stream) {
    VectorD c(n);
    for (Index j = 0; j < n; ++j) c[j] = 0.5 + 1.5 * static_cast<double>((j * 7 + stream) % 11) / 10.0;
    return c;
  };
  const int b = 1;
  BlockInput in;
  in.block = b;
  in.name = "model.layers.1";
  in.arch = &qm.architecture();
  in.config = &qm.config();
  in.weights = &qm.block(b);
  BlockTransforms t = dynamic_cast<const BlockAlgorithm&>(*rot).run(in).transforms;
  std::array<VectorD, kTransformSlots> c;
  for (TransformSlot slot : {TransformSlot::QkvInput, TransformSlot::GateUpInput, TransformSlot::DownInput,
                             TransformSlot::OInputAcrossHeads}) {
    auto& p = t[slot];
    ASSERT_TRUE(p);
    c[static_cast<int>(slot)] = scale(p->width(), static_cast<uint64_t>(slot));
    p = std::make_shared<const InputTransform>(p->with_channel_scale(c[static_cast<int>(slot)]));
  }
  qm.apply_transforms(b, t);
  EXPECT_EQ(qm.scale_folded_into(b, TransformSlot::QkvInput), "input_layernorm");
  EXPECT_EQ(qm.scale_folded_into(b, TransformSlot::GateUpInput), "post_attention_layernorm");
  EXPECT_EQ(qm.scale_folded_into(b, TransformSlot::DownInput), "mlp.up_proj rows");
  EXPECT_EQ(qm.scale_folded_into(b, TransformSlot::OInputAcrossHeads), "");
  const VectorD& ca = c[static_cast<int>(TransformSlot::QkvInput)];
  const VectorD& cu = c[static_cast<int>(TransformSlot::GateUpInput)];
  for (Index j = 0; j < ca.size(); ++j) {
    EXPECT_EQ(qm.block(b).input_norm[j], static_cast<float>(fp->blocks[b].input_norm[j] * ca[j]));
    EXPECT_EQ(qm.block(b).post_attn_norm[j], static_cast<float>(fp->blocks[b].post_attn_norm[j] * cu[j]));
  }
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    const Matrix back = qm.effective_weight(b, kind, qm.block(b).linear(kind).W);
    EXPECT_LT(max_abs_diff(back, fp->blocks[b].linear(kind).W), 1e-5f) << linear_name(b, kind);
  }
  const ForwardHooks h = qm.hooks();
  const Matrix out = Transformer(qm.current()).forward(tokens, &h);
  EXPECT_LT(max_abs_diff(out, ref), 1e-4f * ref.cwiseAbs().maxCoeff());
}

}  // namespace
}  // namespace ql
