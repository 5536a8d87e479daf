// Decode-step attention over a long compressed KV cache (CommVQ, issue 10): one new query of
// every head against N cached tokens of one KV head group (the shared model's layout: 8 query
// heads, 4 KV heads x 32 = one 128-channel codebook group), three ways, in one run:
//   fast     — the commutative fast path: per step the query's products with every sub-table
//              entry of every stage, each token's score a sum of gathered terms rotated on the
//              query side; values by scattering the probabilities onto the entries
//              (vq_key_scores_fast + vq_value_sum_fast);
//   decode   — decode-then-attend on the same codes: decode every key, RoPE, scores, softmax,
//              decode every value, weighted sum (vq_key_scores_decoded + vq_value_sum_decoded);
//   exact    — attention over an exact float32 cache (post-RoPE keys).
// Reported: ms per step (best of reps, one thread), the ratios decode/fast and fast/exact, and
// cache bytes per token and block for FP16, kv_rtn 2-bit (per-token grids per head) and
// CommVQ 2-bit / 1-bit.
//
//   build/bench_kv_vq [reps=5]
#include <cstdio>
#include <string>

#include "bench/bench_util.h"
#include "core/model/kv_vq.h"
#include "core/model/ops.h"
#include "core/parallel.h"

using namespace ql;

namespace {

HeadLayout kHeads{8, 4, 32};

/// Softmax of each row of raw scores (1/sqrt(d) applied here, as attention does).
void softmax_rows(Matrix& S) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeads.head_dim));
  for (Index h = 0; h < S.rows(); ++h) {
    Eigen::ArrayXf p = scale * S.row(h).transpose().array();
    p = (p - p.maxCoeff()).exp();
    S.row(h) = (p / p.sum()).matrix().transpose();
  }
}

std::shared_ptr<VqKvQuantizer> fitted(int stages) {
  KvVqSpec s;
  s.key_stages = stages;
  s.value_stages = stages;
  s.group_heads = 4;
  s.max_steps = 6;  // timing does not depend on codebook quality
  return VqKvQuantizer::fit(s, kHeads, bench::random_matrix(4096, 128, 1, 1), bench::random_matrix(4096, 128, 1, 2));
}

struct Times {
  double fast = 0, decode = 0, exact = 0;
};

Times time_step(const VqKvQuantizer& q, Index n, int reps) {
  const KvChunkCodes kc = q.encode(KvKind::Key, bench::random_matrix(n, 128, 2, 1));
  const KvChunkCodes vc = q.encode(KvKind::Value, bench::random_matrix(n, 128, 2, 2));
  const Matrix Q = bench::random_matrix(kHeads.num_heads, kHeads.head_dim, 2, 3);
  const Matrix K = bench::random_matrix(n, 128, 2, 4), V = bench::random_matrix(n, 128, 2, 5);
  Matrix S, O;
  Times t;
  t.fast = bench::best_seconds(reps, [&] {
    vq_key_scores_fast(q, kc, 0, 10000.0, Q, S);
    softmax_rows(S);
    vq_value_sum_fast(q, vc, S, O);
  });
  t.decode = bench::best_seconds(reps, [&] {
    vq_key_scores_decoded(q, kc, 0, 10000.0, Q, S);
    softmax_rows(S);
    vq_value_sum_decoded(q, vc, S, O);
  });
  t.exact = bench::best_seconds(reps, [&] {
    S.resize(kHeads.num_heads, n);
    for (int h = 0; h < kHeads.num_heads; ++h)
      S.row(h) = K.middleCols(Index(kHeads.kv_head_of(h)) * 32, 32) * Q.row(h).transpose();
    softmax_rows(S);
    O.resize(kHeads.num_heads, 32);
    for (int h = 0; h < kHeads.num_heads; ++h) O.row(h) = S.row(h) * V.middleCols(Index(kHeads.kv_head_of(h)) * 32, 32);
  });
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::stoi(argv[1]) : 5;
  set_num_threads(1);
  std::printf("decode-step attention over one 128-channel KV group (4 KV heads x 32), 1 thread, best of %d\n", reps);
  std::printf("%-10s %12s %7s %10s %10s %10s %13s %12s\n", "cache", "q heads/kv", "tokens", "fast ms", "decode ms",
              "exact ms", "decode/fast", "fast/exact");
  // The shared model's layout (2 query heads per KV head), then one query head per KV head:
  // the fast path's key work grows with the query heads, decoding's with the KV heads.
  for (int qpk : {2, 1}) {
    kHeads = HeadLayout{4 * qpk, 4, 32};
    for (int bits : {2, 1}) {
      const auto q = fitted(bits == 2 ? 21 : 10);
      for (Index n : {Index(4096), Index(16384)}) {
        const Times t = time_step(*q, n, reps);
        std::printf("commvq-%d  %12d %7lld %10.3f %10.3f %10.3f %13.2f %12.2f\n", bits, qpk, static_cast<long long>(n),
                    1e3 * t.fast, 1e3 * t.decode, 1e3 * t.exact, t.decode / t.fast, t.fast / t.exact);
      }
    }
  }
  kHeads = HeadLayout{8, 4, 32};
  ScalarKvSpec rs;
  rs.key_bits = rs.value_bits = 2;
  const auto rtn = make_scalar_kv_quantizer(rs, 32, 128);
  const auto q2 = fitted(21), q1 = fitted(10);
  const Matrix one = bench::random_matrix(1, 128, 3, 1);
  auto per_token = [&](const KvQuantizer& kq) {
    return kq.encode(KvKind::Key, one).bytes() + kq.encode(KvKind::Value, one).bytes();
  };
  std::printf("cache bytes per token and block (K + V, 128 channels each): fp16 %d, kv_rtn 2-bit %lld, "
              "commvq 2-bit %lld, commvq 1-bit %lld\n",
              2 * 128 * 2, static_cast<long long>(per_token(*rtn)), static_cast<long long>(per_token(*q2)),
              static_cast<long long>(per_token(*q1)));
  return 0;
}
