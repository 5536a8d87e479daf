// The vector-quantized KV cache (core/model/kv_vq.h) and the commvq plugin: the fast scoring
// path against decode-then-attend (scores, value sums, next-token logits), the cache's byte
// formula, a KV width 128 does not divide, option errors before compute, and CommVQ against
// scalar 2-bit keys on the shared model.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "algorithms/algorithm.h"
#include "checkpoint_writer.h"
#include "core/error.h"
#include "core/model/checkpoint.h"
#include "core/model/kv_vq.h"
#include "core/model/ops.h"
#include "core/model/transformer.h"
#include "core/rng.h"
#include "experiments/model_runner.h"
#include "experiments/runner.h"

namespace ql {
namespace {

namespace fs = std::filesystem;

/// Pre-RoPE-like keys/values: per-channel scales (a few outlier channels) times noise.
Matrix kv_rows(Index n, Index kvd, uint64_t seed) {
  const CounterRng rng(seed, 11);
  Matrix X(n, kvd);
  for (Index r = 0; r < n; ++r)
    for (Index c = 0; c < kvd; ++c)
      X(r, c) = static_cast<float>((c % 13 == 0 ? 4.0 : 1.0) * rng.normal(static_cast<uint64_t>(r * kvd + c)) +
                                   (c % 7 == 0 ? 2.0 : 0.0));
  return X;
}

KvVqSpec quick_spec(int group_heads, VqStructure keys = VqStructure::Commutative) {
  KvVqSpec s;
  s.key_structure = keys;
  s.key_stage = keys == VqStructure::Commutative ? KvStage::PreRope : KvStage::PostRope;
  s.key_stages = 4;
  s.value_stages = 3;
  s.group_heads = group_heads;
  s.max_steps = 12;
  s.seed = 9;
  return s;
}

double max_rel(const Matrix& a, const Matrix& b) {
  return (a - b).cwiseAbs().maxCoeff() / std::max(1e-30f, b.cwiseAbs().maxCoeff());
}

TEST(KvVq, FastScoringEqualsDecodeThenRopeThenAttend) {
  for (int gh : {4, 2}) {
    const HeadLayout hl{8, 4, 32};
    const auto q = VqKvQuantizer::fit(quick_spec(gh), hl, kv_rows(1500, 128, 1), kv_rows(1500, 128, 2));
    const KvChunkCodes kc = q->encode(KvKind::Key, kv_rows(300, 128, 3));
    const KvChunkCodes vc = q->encode(KvKind::Value, kv_rows(300, 128, 4));
    const Matrix Q = kv_rows(8, 32, 5);
    Matrix fast, dec;
    vq_key_scores_fast(*q, kc, 777, 10000.0, Q, fast);
    vq_key_scores_decoded(*q, kc, 777, 10000.0, Q, dec);
    ASSERT_EQ(fast.rows(), 8);
    ASSERT_EQ(fast.cols(), 300);
    EXPECT_LE(max_rel(fast, dec), 1e-5) << "group heads " << gh;
    Matrix P = (kv_rows(8, 300, 6).array().abs() + 0.1f).matrix();
    for (Index h = 0; h < 8; ++h) P.row(h) /= P.row(h).sum();
    vq_value_sum_fast(*q, vc, P, fast);
    vq_value_sum_decoded(*q, vc, P, dec);
    EXPECT_LE(max_rel(fast, dec), 1e-5) << "group heads " << gh;
  }
}

TEST(KvVq, CacheBytesFollowTheFormula) {
  const HeadLayout hl{8, 4, 32};
  KvVqSpec s = quick_spec(4);
  for (int R : {0, 5}) {
    s.residual_length = R;
    const auto q = VqKvQuantizer::fit(s, hl, kv_rows(400, 128, 1), kv_rows(400, 128, 2));
    // One token: 2 x sub_bits per stage per group, packed to whole bytes, + an fp16 norm per group.
    const int64_t key_row = (2 * 6 * 4 + 7) / 8 + 2, value_row = (2 * 6 * 3 + 7) / 8 + 2;
    EXPECT_EQ(q->encode(KvKind::Key, kv_rows(1, 128, 3)).bytes(), key_row);
    EXPECT_EQ(q->encode(KvKind::Value, kv_rows(1, 128, 3)).bytes(), value_row);
    for (int64_t n : {1, 5, 6, 100}) {
      const int64_t enc = std::max<int64_t>(0, std::min<int64_t>(n, n + 1 - R));
      EXPECT_EQ(q->cache_bytes(n, 128), enc * (key_row + value_row) + (n - enc) * 128 * 2 * 2) << n << " R " << R;
    }
    EXPECT_NEAR(q->bits_per_element(KvKind::Key, 128), (2.0 * 6 * 4 + 16) / 128, 1e-12);
  }
}

/// A checkpoint with 5 KV heads of 32 (KV width 160, which 128 does not divide) and a token-id
/// file, written once.
const std::string& five_head_model() {
  static const std::string dir = [] {
    const std::string d = testutil::fresh_dir("kv_vq_5heads");
    auto cfg = testutil::tiny_config();
    cfg["hidden_size"] = 160;
    cfg["num_attention_heads"] = 5;
    cfg["num_key_value_heads"] = 5;
    cfg["intermediate_size"] = 96;
    cfg["vocab_size"] = 32;
    cfg["max_position_embeddings"] = 512;
    testutil::write_checkpoint(d, cfg, testutil::tiny_model_tensors(cfg));
    std::ofstream ids(d + "/ids.txt");
    for (int w = 0; w < 24; ++w) {
      for (int t = 0; t < 40; ++t) ids << (t ? " " : "") << (7 * w + 5 * t + (t * t) % 11 + 1) % 32;
      ids << "\n";
    }
    return d;
  }();
  return dir;
}

RunConfig five_head_run(const std::string& quant) {
  const std::string d = five_head_model();
  const std::string yaml = "workload: {kind: model, path: " + d + "}\ncalib: {ids: " + d +
                           "/ids.txt, n_samples: 16, seq_len: 32}\neval: {seq_len: 32, token_ids: [{name: t, path: " +
                           d + "/ids.txt}]}\nslices: {n_boot: 0}\nquant: " + quant + "\n";
  return parse_run_config(ConfigNode::parse(yaml, "vq.yaml"), "vq", "vq.yaml", default_registry());
}

double summary(const RunRecord& r, const std::string& metric) {
  for (const auto& s : r.summary)
    if (s.metric == metric) return s.value;
  ADD_FAILURE() << "no summary metric " << metric;
  return std::nan("");
}

TEST(KvVq, AKvWidthThatIsNotAMultipleOf128UsesOneGroupOfWholeHeads) {
  ModelCache cache;
  RunRecord rec;
  execute_model_run(five_head_run("[{algorithm: commvq, k_bits: 2, v_bits: 1, em_steps: 8}]"), cache,
                    default_registry(), rec, {}, {});
  double width = 0, kstages = 0, vstages = 0;
  for (const auto& d : rec.diagnostics) {
    if (d.layer != "model.layers.0.self_attn") continue;
    if (d.name == "group_width") width = d.value;
    if (d.name == "key_stages") kstages = d.value;
    if (d.name == "value_stages") vstages = d.value;
  }
  EXPECT_EQ(width, 160);    // 5 heads x 32: the whole heads closest to 128
  EXPECT_EQ(kstages, 26);   // floor(2 x 160 / 12)
  EXPECT_EQ(vstages, 13);   // floor(1 x 160 / 12)
  EXPECT_NEAR(summary(rec, "kv_bits"), ((26 * 12 + 7) / 8 + 2 + (13 * 12 + 7) / 8 + 2) * 8.0 / (2 * 160), 1e-9);
  EXPECT_LT(summary(rec, "kv_key_rel_mse"), 0.5);
  EXPECT_TRUE(std::isfinite(summary(rec, "t/ppl")));
}

TEST(KvVq, OptionsTheHeadsCannotTakeFailBeforeAnyComputeWithTheKeyPath) {
  ModelCache cache;
  auto fails = [&](const std::string& quant, const std::string& path) {
    RunRecord rec;
    try {
      execute_model_run(five_head_run(quant), cache, default_registry(), rec, {}, {});
      ADD_FAILURE() << quant << ": no error";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.key_path(), path) << e.what();
      EXPECT_TRUE(rec.diagnostics.empty()) << "computed before failing: " << quant;
    }
  };
  fails("[{algorithm: commvq, group_heads: 2}]", "quant.0.group_heads");  // 2 does not divide 5 heads
  fails("[{algorithm: commvq, k_bits: 0.05}]", "quant.0.k_bits");          // 8 bits: no 12-bit stage
  fails("[{algorithm: rtn, bits: 4}, {algorithm: commvq, v_bits: 0.01}]", "quant.1.v_bits");
  EXPECT_THROW(five_head_run("[{algorithm: commvq, key_stage: post_rope}]"), ConfigError);
}

/// The next-token logits of incremental decoding with the encoded (fast) attention path equal
/// the default path's, which reads the decoded cache.
TEST(KvVq, EncodedAttentionGivesTheSameNextTokenLogits) {
  const ModelWeights w = load_checkpoint(five_head_model());
  const Transformer tf(w);
  std::vector<int32_t> toks;
  for (int t = 0; t < 200; ++t) toks.push_back((3 * t + (t * t) % 7 + 1) % 32);
  // Fit each block's codebooks on the exact model's pre-RoPE keys and values.
  std::vector<Matrix> K(2), V(2);
  ForwardHooks cap;
  cap.kv = [&](int b, KvStage st, Matrix& k, Matrix& v) {
    if (st == KvStage::PreRope) K[b] = k, V[b] = v;
  };
  tf.forward(toks, &cap);
  const HeadLayout hl{5, 5, 32};
  for (int R : {0, 3}) {
    KvVqSpec s = quick_spec(5);
    s.residual_length = R;
    std::vector<std::shared_ptr<VqKvQuantizer>> q = {VqKvQuantizer::fit(s, hl, K[0], V[0]),
                                                     VqKvQuantizer::fit(s, hl, K[1], V[1])};
    ForwardHooks hooks;
    hooks.kv_quantizer = [&](int b) { return q[static_cast<size_t>(b)].get(); };
    Transformer::KvCache plain, fast;
    fast.set_encoded_attention(true);
    tf.forward_incremental(std::vector<int32_t>(toks.begin(), toks.begin() + 150), plain, &hooks);
    tf.forward_incremental(std::vector<int32_t>(toks.begin(), toks.begin() + 150), fast, &hooks);
    for (int t = 150; t < 160; ++t) {
      const Matrix a = tf.forward_incremental({toks[t]}, plain, &hooks);
      const Matrix b = tf.forward_incremental({toks[t]}, fast, &hooks);
      EXPECT_LE(max_rel(b, a), 1e-4) << "R " << R << " token " << t;
    }
    EXPECT_EQ(fast.bytes(0), plain.bytes(0));
  }
  // The flag does take the encoded path: free (post-RoPE) key codebooks have none, and say so.
  const KvVqSpec fs_spec = quick_spec(5, VqStructure::Free);
  const auto fq = VqKvQuantizer::fit(fs_spec, hl, K[0], V[0]);
  ForwardHooks hooks;
  hooks.kv_quantizer = [&](int) { return fq.get(); };
  Transformer::KvCache fast;
  fast.set_encoded_attention(true);
  tf.forward_incremental(std::vector<int32_t>(toks.begin(), toks.begin() + 20), fast, &hooks);
  EXPECT_THROW(tf.forward_incremental({toks[20]}, fast, &hooks), ShapeError);
}

TEST(KvVq, CommVq2BitKeysBeatScalar2BitKeysOnTheSharedModel) {
  const fs::path data = QL_SHARED_DATA_DIR;
  if (!fs::exists(data / "austen-llama-7m" / "config.json")) GTEST_SKIP() << "../shared/data not found";
  const std::string d = data.string();
  auto run = [&](const std::string& quant) {
    const std::string yaml = "workload: {kind: model, path: " + d + "/austen-llama-7m}\ncalib: {text: " + d +
                             "/text/austen_train.txt, n_samples: 12, seq_len: 256}\neval: {seq_len: 256, streams: "
                             "[{name: p, path: " + d + "/text/persuasion.txt, max_windows: 2}]}\nslices: {n_boot: 0}\n"
                             "quant: " + quant + "\n";
    static ModelCache cache;
    RunRecord rec;
    execute_model_run(parse_run_config(ConfigNode::parse(yaml, "k.yaml"), "k", "k.yaml", default_registry()), cache,
                      default_registry(), rec, {}, {});
    return rec;
  };
  const RunRecord vq = run("[{algorithm: commvq, k_bits: 2, v_stages: 1, em_steps: 40, "
                           "targets: [\"model\\\\.layers\\\\.[02]\\\\.self_attn\"]}]");
  const RunRecord rtn = run("[{algorithm: kv_rtn, k_bits: 2, v_bits: 2, "
                            "targets: [\"model\\\\.layers\\\\.[02]\\\\.self_attn\"]}]");
  // Held-out key error of the same blocks (relative MSE is the same before and after RoPE).
  EXPECT_LT(summary(vq, "kv_key_rel_mse"), 0.5 * summary(rtn, "kv_key_rel_mse"));
  EXPECT_LT(summary(vq, "kv_attn_score_rel_err"), summary(rtn, "kv_attn_score_rel_err"));
}

}  // namespace
}  // namespace ql
