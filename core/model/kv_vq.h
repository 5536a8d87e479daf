// Vector-quantized KV cache (CommVQ, arXiv 2506.18879; ALGORITHMS.md §7): per group of KV
// heads, keys and values are stored as residual additive codes (core/vq.h) plus one fp16 norm
// per token and group, and attention can score encoded keys without decoding them.
//
// Groups: whole KV heads, group_heads of them (a group never splits a head, so never a RoPE
// pair). Inside a key group the channels are reordered so that each rotate-half RoPE pair
// (head h: i, i + head_dim/2) is one complex entry, pairs in head order; the commutative
// codebook acts on these pairs. Value groups keep their channel order.
//
// Keys: per token and group, k = ‖k‖ · k̂ with k̂ the encoded unit vector; the norm is stored
// in fp16 (and decoding uses the stored value). Commutative keys are quantized before RoPE;
// the free ablation at the stage the spec says (after RoPE by default: a free codebook does
// not commute with RoPE).
// Values: divided by a fixed per-channel scale (mean |v| over calibration, the reference's
// make_scale.py), then norm + unit vector as keys, free codebook.
//
// Read rule: chunks of one token, R exact recent tokens (core/model/kv_cache_quant.h).
// Storage per token and group: code_bits (2 · sub_bits · stages) + 16 (norm) for K and for V.
#pragma once
#include <memory>
#include <vector>

#include "core/model/architecture.h"
#include "core/model/kv_cache_quant.h"
#include "core/vq.h"

namespace ql {

struct KvVqSpec {
  VqStructure key_structure = VqStructure::Commutative;
  KvStage key_stage = KvStage::PreRope;  ///< Commutative requires PreRope
  int key_stages = 21, value_stages = 21;
  int sub_bits = 6;
  int group_heads = 1;                   ///< KV heads per group; divides num_kv_heads
  int residual_length = 0;
  int max_steps = 100;
  double t_start = 1e-3, t_end = 1e-5;
  uint64_t seed = 0;
};

/// The fit of one block: per group, the EM reports of the key and value stages.
struct KvVqFitReport {
  std::vector<std::vector<VqStageReport>> keys, values;  ///< [group][stage]
};

class VqKvQuantizer final : public KvQuantizer {
 public:
  /// Fits the key and value codebooks of every group on calibration keys (at spec.key_stage;
  /// rows = tokens, kv_dim columns) and values. ShapeError for a group that does not divide
  /// the heads, a Commutative spec with post-RoPE keys, or too few tokens.
  static std::shared_ptr<VqKvQuantizer> fit(const KvVqSpec& spec, const HeadLayout& heads, const Matrix& keys,
                                            const Matrix& values, KvVqFitReport* report = nullptr);

  KvStage key_stage() const override { return spec_.key_stage; }
  int key_chunk() const override { return 1; }
  int value_chunk() const override { return 1; }
  int residual_length() const override { return spec_.residual_length; }
  /// codes: rows x (groups · 2 · stages) bytes at sub_bits each; scales: rows x groups fp16
  /// norms.
  KvChunkCodes encode(KvKind kind, const Matrix& X) const override;
  void decode(const KvChunkCodes& codes, Matrix& X) const override;
  double bits_per_element(KvKind kind, Index kv_dim) const override;
  std::string describe() const override;
  /// vq_key_scores_fast / vq_value_sum_fast (commutative pre-RoPE keys only for scores).
  bool encoded_scores(const KvChunkCodes& keys, const RopeSpec& rope, const Matrix& queries, Matrix& out) const override;
  bool encoded_value_sum(const KvChunkCodes& values, const Matrix& p, Matrix& out) const override;

  const KvVqSpec& spec() const { return spec_; }
  const HeadLayout& heads() const { return heads_; }
  int groups() const { return static_cast<int>(key_vq_.size()); }
  Index group_width() const { return Index(spec_.group_heads) * heads_.head_dim; }
  const ResidualVq& key_codebook(int g) const { return key_vq_.at(g); }
  const ResidualVq& value_codebook(int g) const { return value_vq_.at(g); }
  /// Bytes of the codebooks and value scales at fp16 (a per-block constant, not in the cache).
  int64_t codebook_bytes() const;
  /// Per-channel value scale (kv_dim).
  const Vector& value_scale() const { return value_scale_; }
  /// Column of the kv_dim-wide row that entry e of group g's vector holds (keys: paired
  /// layout, entries 2j, 2j+1 = pair j; values: channel order).
  Index key_channel(int g, Index e) const { return g * group_width() + key_perm_[e]; }
  Index value_channel(int g, Index e) const { return g * group_width() + e; }

 private:
  VqKvQuantizer(const KvVqSpec& spec, const HeadLayout& heads);
  /// Rows of X gathered into group g's layout, divided by the value scale for values.
  Matrix gather(KvKind kind, const Matrix& X, int g) const;

  KvVqSpec spec_;
  HeadLayout heads_;
  std::vector<Index> key_perm_;  ///< paired layout entry -> channel within a group
  Vector value_scale_;
  std::vector<ResidualVq> key_vq_, value_vq_;
};

/// Attention scores of query heads against n encoded keys at positions pos0 .. pos0+n-1, for
/// incremental decoding. q: num_heads x head_dim, post-RoPE (at the query's position); out:
/// num_heads x n raw dot products q·RoPE(k̂) (no 1/sqrt(d) scale).
///
/// Fast path (commutative keys only; CommVQ §3): per query head and stage, the products of the
/// query with every sub-table entry of its head's pairs, P_s[e]_j = conj(q_j)·u_s,j[e], are
/// computed once and shared by all cached tokens; a token's score is then
///   ‖k‖ · Σ_j Re(e^{i m θ_j} Σ_s (P_s[A_s]_j + i·P_s[B_s]_j)),
/// a sum of gathered terms with the token's rotation applied on the query side.
void vq_key_scores_fast(const VqKvQuantizer& q, const KvChunkCodes& keys, int64_t pos0, const RopeSpec& rope,
                        const Matrix& queries, Matrix& out);
/// The same scores by decoding each key, applying RoPE and taking the dot products.
void vq_key_scores_decoded(const VqKvQuantizer& q, const KvChunkCodes& keys, int64_t pos0, const RopeSpec& rope,
                           const Matrix& queries, Matrix& out);
/// Σ_t p_t v̂_t per query head over n encoded values (p: num_heads x n). Fast path: the
/// probabilities are scattered onto the sub-table entries each token selects (a sum over
/// tokens per stage and entry), then one small product with the sub-tables; decoded path:
/// decode every value and accumulate. out: num_heads x head_dim.
void vq_value_sum_fast(const VqKvQuantizer& q, const KvChunkCodes& values, const Matrix& p, Matrix& out);
void vq_value_sum_decoded(const VqKvQuantizer& q, const KvChunkCodes& values, const Matrix& p, Matrix& out);

}  // namespace ql
