// The block backward pass of core/model/block_grad.h: every op's backward and the whole block's
// against central finite differences of the same forward in double on tiny shapes; the float
// forward against Transformer::block; the float gradients against PyTorch autograd (float64) on
// block 2 of the shared model (../shared/data/austen-llama-7m/golden/block2_grad.*); and the
// bits for 1 and 2 threads.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>

#include "core/model/block_grad.h"
#include "core/model/checkpoint.h"
#include "core/model/safetensors.h"
#include "core/model/transformer.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "tests/fd_util.h"

namespace ql {
namespace {

namespace fs = std::filesystem;

MatrixD rnd(Index r, Index c, uint64_t stream, double scale = 1.0) { return fd::gaussian(r, c, 29, stream, scale); }

VectorD rndv(Index n, uint64_t stream, double scale = 1.0, double offset = 0.0) {
  return fd::gaussian_vec(n, 29, stream, scale, offset);
}

using fd::dot;
const auto fd_error = [](const std::function<double()>& loss, double* x, Index n, const double* analytic) {
  return fd::error(loss, x, n, analytic);
};

constexpr double kFdTol = 1e-7;

TEST(BlockGrad, LinearMatchesFiniteDifferences) {
  MatrixD X = rnd(7, 5, 1), W = rnd(6, 5, 2), R = rnd(7, 6, 3);
  VectorD b = rndv(6, 4);
  auto loss = [&] {
    MatrixD Y;
    linear_fwd<double>(X, W, &b, Y);
    return dot(Y, R);
  };
  MatrixD dX, dW = MatrixD::Zero(6, 5);
  VectorD db = VectorD::Zero(6);
  linear_bwd<double>(R, X, W, &dX, false, &dW, &db);
  EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), kFdTol);
  EXPECT_LT(fd_error(loss, W.data(), W.size(), dW.data()), kFdTol);
  EXPECT_LT(fd_error(loss, b.data(), b.size(), db.data()), kFdTol);
}

TEST(BlockGrad, RmsNormMatchesFiniteDifferences) {
  MatrixD x = rnd(4, 9, 5), R = rnd(4, 9, 6);
  VectorD w = rndv(9, 7, 0.3, 1.0);
  auto loss = [&] {
    MatrixD y;
    VectorD r;
    rmsnorm_fwd<double>(x, w, 1e-5, y, r);
    return dot(y, R);
  };
  MatrixD y;
  VectorD rstd, dw = VectorD::Zero(9);
  rmsnorm_fwd<double>(x, w, 1e-5, y, rstd);
  MatrixD dx = MatrixD::Zero(4, 9);
  rmsnorm_bwd<double>(R, x, w, rstd, dx, &dw);
  EXPECT_LT(fd_error(loss, x.data(), x.size(), dx.data()), kFdTol);
  EXPECT_LT(fd_error(loss, w.data(), w.size(), dw.data()), kFdTol);
}

TEST(BlockGrad, RopeMatchesFiniteDifferences) {
  const int heads = 3, hd = 6;
  RopeTables tab;
  rope_tables(3, 5, hd, 10000.0, tab);
  MatrixD X = rnd(5, heads * hd, 8), R = rnd(5, heads * hd, 9);
  auto loss = [&] {
    MatrixD Y = X;
    rope_fwd<double>(Y, 5, heads, hd, tab);
    return dot(Y, R);
  };
  MatrixD dX = R;
  rope_bwd<double>(dX, 5, heads, hd, tab);
  EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), kFdTol);
}

TEST(BlockGrad, AttentionMatchesFiniteDifferences) {
  // 4 query heads over 2 KV heads (GQA) so K/V gradients sum over a group; two windows of 70
  // tokens, so the causal chunks of 64 query rows include a partial one.
  const int heads = 4, kv = 2, hd = 4;
  const Index T = 140, win = 70;
  MatrixD Q = rnd(T, heads * hd, 10), K = rnd(T, kv * hd, 11), V = rnd(T, kv * hd, 12),
          R = rnd(T, heads * hd, 13);
  auto loss = [&] {
    MatrixD out;
    std::vector<MatrixD> P;
    attention_fwd<double>(Q, K, V, win, heads, kv, hd, out, P);
    return dot(out, R);
  };
  MatrixD out, dQ, dK, dV;
  std::vector<MatrixD> P;
  attention_fwd<double>(Q, K, V, win, heads, kv, hd, out, P);
  // Causality: the first query of each window attends to itself only.
  for (size_t i = 0; i < P.size(); ++i) EXPECT_DOUBLE_EQ(P[i](0, 0), 1.0);
  attention_bwd<double>(R, Q, K, V, win, P, heads, kv, hd, dQ, dK, dV);
  EXPECT_LT(fd_error(loss, Q.data(), Q.size(), dQ.data()), kFdTol);
  EXPECT_LT(fd_error(loss, K.data(), K.size(), dK.data()), kFdTol);
  EXPECT_LT(fd_error(loss, V.data(), V.size(), dV.data()), kFdTol);
}

TEST(BlockGrad, SwigluMatchesFiniteDifferences) {
  MatrixD g = rnd(5, 7, 14, 3.0), u = rnd(5, 7, 15), R = rnd(5, 7, 16);
  auto loss = [&] {
    MatrixD a, sig;
    swiglu_fwd<double>(g, u, a, sig);
    return dot(a, R);
  };
  MatrixD a, sig, dg, du;
  swiglu_fwd<double>(g, u, a, sig);
  swiglu_bwd<double>(R, g, u, sig, dg, du);
  EXPECT_LT(fd_error(loss, g.data(), g.size(), dg.data()), kFdTol);
  EXPECT_LT(fd_error(loss, u.data(), u.size(), du.data()), kFdTol);
}

/// A tiny block: hidden 8, 4 heads of 4 over 2 KV heads, intermediate 12, q/k/v biases.
BlockParams<double> tiny_params(BlockShape& s) {
  s.n_heads = 4;
  s.n_kv_heads = 2;
  s.head_dim = 4;
  s.eps = 1e-5;
  s.rope = RopeSpec(10000.0);
  BlockParams<double> p;
  const Index d = 8, qd = 16, kvd = 8, ff = 12;
  p.input_norm = rndv(d, 20, 0.2, 1.0);
  p.post_attn_norm = rndv(d, 21, 0.2, 1.0);
  p.q = rnd(qd, d, 22, 0.5);
  p.k = rnd(kvd, d, 23, 0.5);
  p.v = rnd(kvd, d, 24, 0.5);
  p.o = rnd(d, qd, 25, 0.3);
  p.gate = rnd(ff, d, 26, 0.5);
  p.up = rnd(ff, d, 27, 0.5);
  p.down = rnd(d, ff, 28, 0.3);
  p.bq = rndv(qd, 29, 0.1);
  p.bk = rndv(kvd, 30, 0.1);
  p.bv = rndv(kvd, 31, 0.1);
  return p;
}

TEST(BlockGrad, WholeBlockMatchesFiniteDifferences) {
  BlockShape s;
  BlockParams<double> p = tiny_params(s);
  MatrixD x = rnd(14, 8, 40), R = rnd(14, 8, 41);
  const int64_t pos0 = 5;  // two windows of 7, RoPE at positions 5..11 each
  auto loss = [&] {
    RopeTables tab;
    BlockTape<double> tape;
    block_fwd(s, p, x, 7, pos0, tab, tape);
    return dot(tape.y, R);
  };
  RopeTables tab;
  BlockTape<double> tape;
  block_fwd(s, p, x, 7, pos0, tab, tape);
  BlockParams<double> gr = BlockParams<double>::zeros_like(p);
  MatrixD dx;
  block_bwd(s, p, tape, tab, R, dx, gr);
  EXPECT_LT(fd_error(loss, x.data(), x.size(), dx.data()), kFdTol);
  EXPECT_LT(fd_error(loss, p.input_norm.data(), p.input_norm.size(), gr.input_norm.data()), kFdTol);
  EXPECT_LT(fd_error(loss, p.post_attn_norm.data(), p.post_attn_norm.size(), gr.post_attn_norm.data()), kFdTol);
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    MatrixD& W = p.linear(kind);
    EXPECT_LT(fd_error(loss, W.data(), W.size(), gr.linear(kind).data()), kFdTol) << linear_suffix(kind);
  }
  EXPECT_LT(fd_error(loss, p.bq.data(), p.bq.size(), gr.bq.data()), kFdTol);
  EXPECT_LT(fd_error(loss, p.bk.data(), p.bk.size(), gr.bk.data()), kFdTol);
  EXPECT_LT(fd_error(loss, p.bv.data(), p.bv.size(), gr.bv.data()), kFdTol);
}

const fs::path kModel = fs::path(QL_SHARED_DATA_DIR) / "austen-llama-7m";

TEST(BlockGrad, FloatForwardAgreesWithTransformerBlock) {
  if (!fs::exists(kModel / "config.json")) GTEST_SKIP() << "needs ../shared/data/austen-llama-7m";
  const ModelWeights w = load_checkpoint(kModel.string());
  const Transformer tf(w);
  std::vector<int32_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37 + 11) % 4096);
  Matrix h = tf.embed(ids);
  for (int b = 0; b < 2; ++b) h = tf.block(b, h);
  const Matrix ref = tf.block(2, h);
  const BlockShape s = BlockShape::of(w.config);
  const BlockParams<float> p = BlockParams<float>::from(w.blocks[2]);
  RopeTables tab;
  BlockTape<float> tape;
  block_fwd(s, p, h, h.rows(), 0, tab, tape);
  EXPECT_LT((tape.y - ref).norm(), 2e-6 * ref.norm());
}

/// Golden tensors of block2_grad.safetensors as float32 matrices (windows stacked as rows).
struct Golden {
  SafetensorsFile f;
  Matrix get(const std::string& name, Index rows, Index cols) const {
    Matrix m(rows, cols);
    f.read_into(name, m.data(), m.size());
    return m;
  }
};

TEST(BlockGrad, MatchesPytorchAutogradOnTheSharedModel) {
  const fs::path golden = kModel / "golden" / "block2_grad.safetensors";
  if (!fs::exists(golden)) GTEST_SKIP() << "needs " << golden;
  const ModelWeights w = load_checkpoint(kModel.string());
  const Golden g{SafetensorsFile::open(golden.string())};
  const Index W = 2, T = 64, d = w.config.hidden_size;
  const Matrix x = g.get("x", W * T, d), r = g.get("r", W * T, d), y = g.get("y", W * T, d);
  const BlockShape s = BlockShape::of(w.config);
  const BlockParams<float> p = BlockParams<float>::from(w.blocks[2]);
  BlockParams<float> gr = BlockParams<float>::zeros_like(p);
  Matrix dx;
  RopeTables tab;
  BlockTape<float> tape;
  block_fwd<float>(s, p, x, T, 0, tab, tape);
  const Matrix& yours = tape.y;
  block_bwd<float>(s, p, tape, tab, r, dx, gr);
  auto rel = [](const Matrix& a, const Matrix& b) { return (a - b).norm() / b.norm(); };
  EXPECT_LT(rel(yours, y), 1e-5) << "forward";
  const double ex = rel(dx, g.get("grad.x", W * T, d));
  EXPECT_LT(ex, 1e-4) << "grad.x";
  std::printf("[golden] grad.x rel %.2e\n", ex);
  auto vec_rel = [&](const Vector& a, const std::string& name) {
    const Matrix ref = g.get(name, a.size(), 1);
    return (a - Eigen::Map<const Vector>(ref.data(), a.size())).norm() / ref.norm();
  };
  EXPECT_LT(vec_rel(gr.input_norm, "grad.input_layernorm.weight"), 1e-4);
  EXPECT_LT(vec_rel(gr.post_attn_norm, "grad.post_attention_layernorm.weight"), 1e-4);
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    const Matrix& gw = gr.linear(kind);
    const std::string name = std::string("grad.") + linear_suffix(kind) + ".weight";
    const double e = rel(gw, g.get(name, gw.rows(), gw.cols()));
    EXPECT_LT(e, 1e-4) << name;
    std::printf("[golden] %-32s rel %.2e\n", name.c_str(), e);
  }
}

TEST(BlockGrad, BitsDoNotDependOnTheThreadCount) {
  BlockShape s;
  const BlockParams<double> pd = tiny_params(s);
  // A float block wide enough for several tiles: hidden 8 is one tile, so stack 300 tokens.
  BlockParams<float> p;
  p.input_norm = pd.input_norm.cast<float>();
  p.post_attn_norm = pd.post_attn_norm.cast<float>();
  for (int k = 0; k < kLinearKinds; ++k)
    p.linear(static_cast<LinearKind>(k)) = pd.linear(static_cast<LinearKind>(k)).cast<float>();
  p.bq = pd.bq.cast<float>();
  p.bk = pd.bk.cast<float>();
  p.bv = pd.bv.cast<float>();
  const Matrix x = rnd(300, 8, 50).cast<float>(), r = rnd(300, 8, 51).cast<float>();
  auto run = [&](int threads, Matrix& dx, BlockParams<float>& gr) {
    ThreadCountGuard guard(threads);
    RopeTables tab;
    BlockTape<float> tape;
    block_fwd<float>(s, p, x, 100, 0, tab, tape);
    gr = BlockParams<float>::zeros_like(p);
    block_bwd<float>(s, p, tape, tab, r, dx, gr);
  };
  Matrix dx1, dx2;
  BlockParams<float> g1, g2;
  run(1, dx1, g1);
  run(2, dx2, g2);
  EXPECT_EQ(std::memcmp(dx1.data(), dx2.data(), sizeof(float) * dx1.size()), 0);
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    EXPECT_EQ(std::memcmp(g1.linear(kind).data(), g2.linear(kind).data(), sizeof(float) * g1.linear(kind).size()), 0)
        << linear_suffix(kind);
  }
}

}  // namespace
}  // namespace ql
