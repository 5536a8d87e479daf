// Float32 forward pass of a LLaMA-family decoder (LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM) over a ModelWeights (core/model/model.h), with hooks at every linear and
// at the attention's keys/values, a KV cache for incremental decoding, and a batched path.
//
// Per block, with h the T x hidden residual stream of one window (row = token):
//   x  = RMSNorm(h) ⊙ w_in,   RMSNorm(x) = x · 1/sqrt(mean(x²) + eps)   (float32, as HF)
//   Q, K, V = x Wqᵀ (+bq), x Wkᵀ (+bk), x Wvᵀ (+bv)
//   Q, K <- rotate-half RoPE: inv_freq_i = 1 / theta^(2i/head_dim) and angle = pos · inv_freq_i,
//           both rounded to float32 exactly as HF computes them; cos/sin repeated over both halves
//   head j attends with kv head j / (num_heads / num_kv_heads), causal softmax of
//           Q_j K_gᵀ / sqrt(head_dim), output P V_g
//   h += attn Woᵀ;   x = RMSNorm(h) ⊙ w_post;   h += (silu(x Wgᵀ) ⊙ x Wuᵀ) Wdᵀ
// then logits = RMSNorm(h) ⊙ w_final · lm_headᵀ. Positions start at 0 for each window unless a
// cache or pos0 says otherwise.
//
// Determinism: every matrix product is cut into fixed tiles (kPanelRows token rows x
// kTileCols output columns; attention in fixed chunks of query rows per head), each tile is one
// single-threaded tile call of core/linalg.h (OpenBLAS in `numerics: fast`, the portable kernels
// in `portable`; exp, sin and cos from core/detmath), and all reductions have a fixed order.
// forward() spreads the tiles
// of one window over the OpenMP threads; forward_batch() runs whole windows on different
// threads with the same tiles in sequence; windows shorter than 16 tokens run on the calling
// thread alone. Hence results are bitwise identical for any thread count and between forward(),
// forward_batch() and the embed/block/head pieces. forward_incremental() uses different
// product shapes, so it agrees with forward() to float32 rounding (~1e-6), not bitwise.
// (A single product over several windows at once would not do: OpenBLAS's bits depend on the
// call's shape, so every path issues the same per-window tiles.) Across machines, results are
// bitwise equal in portable mode; in fast mode they depend on the kernels OpenBLAS picked.
//
// Thread safety: a Transformer is immutable after construction; its const methods may be called
// concurrently. It keeps a reference to the ModelWeights, which must outlive it and must not be
// modified while a call runs. A KvCache must not be shared between concurrent calls.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/model/kv_cache_quant.h"
#include "core/model/model.h"
#include "core/model/ops.h"
#include "core/tensor.h"

namespace ql {

/// Stages of a decoder block (Transformer::block_stage): one per input group of linears.
constexpr int kBlockStages = 4;

/// One window between the stages of a block (Transformer::block_stage).
struct BlockStageState {
  Matrix h;       ///< residual stream: the block's input, updated by stages 1 and 3
  Matrix x;       ///< attention's output before stage 1, SwiGLU's before stage 3 (else empty)
  int stage = 0;  ///< the next stage to run (kBlockStages: done, h is the block's output)
};

/// Optional callbacks into the forward pass. Unset members cost nothing.
///
/// Order at each linear (Q, K, V, O, Gate, Up, Down of block b):
///   1. transform_input(b, kind, X) may modify X in place (e.g. activation fake-quant); shape
///      must stay. Q/K/V (and Gate/Up) read the same normed activations; each kind receives
///      its own copy, so a transform of Q's input does not leak into K's.
///   2. capture_input(b, kind, X) sees exactly what the linear multiplies (after the transform).
///   3. Y = X Wᵀ + b.
/// X is tokens x d_in: the new tokens of this call only (never cached ones).
///
/// kv(b, stage, K, V) is called twice per block, PreRope then PostRope, with K and V of the
/// new tokens (tokens x num_kv_heads*head_dim; head g = columns [g*head_dim, (g+1)*head_dim)).
/// It may capture them or substitute values in place (shape must stay); what it leaves is what
/// attention uses and what the KV cache stores.
///
/// kv_quantizer(b), when set and non-null, is block b's KV-cache quantizer: attention reads
/// keys and values per its read rule (core/model/kv_cache_quant.h), quantized below each
/// query's threshold and exact above; keys at its key_stage(). In forward() the window's
/// positions start at 0; block() with a quantizer needs pos0 = 0. forward_incremental() keeps
/// the quantized part of the cache as codes (KvCache::bytes()).
///
/// Thread safety: in forward_batch() with a shared ForwardHooks the callbacks are called
/// concurrently from different windows and must be thread-safe; the per-window overload of
/// forward_batch() avoids that. Elsewhere they are called from the calling thread, outside any
/// OpenMP region (so a callback may itself use OpenMP/linalg.h). A callback may throw; the
/// exception propagates out of the forward call (of forward_batch: the lowest window's).
struct ForwardHooks {
  std::function<void(int block, LinearKind kind, const Matrix& X)> capture_input;
  std::function<void(int block, LinearKind kind, Matrix& X)> transform_input;
  std::function<void(int block, KvStage stage, Matrix& K, Matrix& V)> kv;
  std::function<const KvQuantizer*(int block)> kv_quantizer;
  /// Called after RoPE with the new tokens' Q (tokens x q_dim) and K (tokens x kv_dim), before
  /// the PostRope kv hook: may transform both in place (e.g. a per-head P_k on keys and P_k⁻ᵀ
  /// on queries, which leaves every score unchanged and changes what the cache quantizes).
  std::function<void(int block, Matrix& Q, Matrix& K)> transform_qk;
};

class Transformer {
 public:
  /// Keys and values of past tokens, per block, after the kv hooks and RoPE (post-RoPE K).
  /// Filled by forward_incremental() of one model; reusing a non-empty cache with a model of
  /// other shapes is a ShapeError. Not thread-safe: one decoding sequence per cache.
  class KvCache {
   public:
    /// Number of cached tokens (= position of the next token).
    int64_t length() const { return length_; }
    void clear() {
      length_ = 0;
      enc_.clear();
    }
    /// Cached keys (post-RoPE) / values of block b: length() x (num_kv_heads*head_dim), a view
    /// valid until the next call that modifies the cache (0 x 0 before the first call). With a
    /// KV quantizer, rows of encoded chunks hold their decoded values (RoPE applied for
    /// pre-RoPE keys), the others exact.
    Eigen::Map<const Matrix> keys(int b) const;
    Eigen::Map<const Matrix> values(int b) const;
    /// Bytes block b's cache occupies as stored: encoded chunks (KvChunkCodes::bytes()) plus
    /// the exact rows at 16 bits. Without a quantizer every row is exact. The decoded float
    /// mirror above is a convenience of this simulation (attention reads it without decoding
    /// each step) and is not counted.
    int64_t bytes(int b) const;
    /// Single-token steps attend to the encoded tokens through the quantizer's encoded path
    /// (KvQuantizer::encoded_scores / encoded_value_sum: CommVQ's fast scoring, no decoding)
    /// instead of the decoded mirror; equal to the default path up to float rounding. A step
    /// whose quantizer has no such path, or whose key/value chunk is not one token, throws.
    void set_encoded_attention(bool on) { encoded_attention_ = on; }
    bool encoded_attention() const { return encoded_attention_; }
    /// Rows of block b's keys / values that are held as codes.
    int64_t encoded_keys(int b) const { return enc_.empty() ? 0 : enc_.at(b).k; }
    int64_t encoded_values(int b) const { return enc_.empty() ? 0 : enc_.at(b).v; }

   private:
    friend class Transformer;
    /// Per block: encoded chunks, how many leading rows they cover, and the pre-RoPE keys of the
    /// rows not yet encoded (pre-RoPE key quantizers only; row i = position k + i).
    struct Encoded {
      std::vector<KvChunkCodes> codes;
      int64_t k = 0, v = 0;
      Matrix k_pre;
    };
    std::vector<Matrix> k_, v_;  // per block; capacity rows, the first length_ are valid
    std::vector<Encoded> enc_;   // per block, when a quantizer ran
    int64_t length_ = 0;
    bool encoded_attention_ = false;
  };

  /// Validates the config sizes and every tensor shape (ShapeError naming the tensor). Keeps a
  /// reference to `weights`; to run with substituted (e.g. quantized) weights, build another
  /// Transformer over another ModelWeights.
  explicit Transformer(const ModelWeights& weights);
  /// A temporary would dangle.
  explicit Transformer(ModelWeights&&) = delete;

  const ModelConfig& config() const { return w_.config; }
  const ModelWeights& weights() const { return w_; }

  /// Logits (T x vocab) of one window; token t is at position t (T = 0 gives 0 x vocab).
  /// Token ids must lie in [0, vocab) (ShapeError naming the id and position). Spreads the
  /// product tiles over the OpenMP threads (one thread below 16 tokens; same bits).
  Matrix forward(const std::vector<int32_t>& tokens, const ForwardHooks* hooks = nullptr) const;

  /// Pieces of forward() for the block-sequential calibration runner:
  /// forward(t) == head(block(L-1, ... block(0, embed(t), 0) ...)) bitwise.
  /// embed: T x hidden rows of the embedding table.
  Matrix embed(const std::vector<int32_t>& tokens) const;
  /// One decoder block on the residual stream h (T x hidden) -> T x hidden. pos0 is the
  /// position of h's first row (RoPE only; attention is causal within h). override_weights,
  /// when given, replaces block b's weights (same shapes; e.g. a block being quantized).
  Matrix block(int b, const Matrix& h, int64_t pos0 = 0, const ForwardHooks* hooks = nullptr,
               const DecoderBlock* override_weights = nullptr) const;
  /// block() of many windows (each at pos0 = 0; lengths may differ), in place: h[i] becomes
  /// block(b, h[i], 0, &per_window[i], override_weights) bitwise. Windows are spread over the
  /// threads when there are at least as many as threads, otherwise each window's tiles are
  /// (the same bits either way). per_window[i]'s callbacks are only called by the thread
  /// running window i. Calibration passes use this: all windows of a block in one call.
  void block_batch(int b, std::vector<Matrix*>& h, const std::vector<ForwardHooks>& per_window,
                   const DecoderBlock* override_weights = nullptr) const;
  /// A decoder block in kBlockStages stages, for calibration that changes a block between
  /// its groups of linears (GPTQ's true-sequential order) without recomputing earlier stages:
  /// stage s computes the input of group s of the architecture table (q/k/v, o, gate/up, down)
  /// and runs that group's linears: 0 = RMSNorm, q/k/v, RoPE, attention; 1 = o_proj and the
  /// residual; 2 = RMSNorm, gate/up, SwiGLU; 3 = down_proj and the residual. The RMSNorms
  /// belong to the stage they feed, so a norm folded by a step between stages is used.
  /// block_stage_begin starts a window at its block input h; after the last stage h is the
  /// block's output. Stages 0..3 in order equal block(b, h, 0, hooks, weights) bitwise when
  /// every stage gets the same weights and hooks; a caller may change the weights or hooks of
  /// later groups between stages. Windows are spread as in block_batch.
  void block_stage_begin(int b, const Matrix& h, BlockStageState& state) const;
  void block_stage(int b, int stage, std::vector<BlockStageState*>& windows,
                   const std::vector<ForwardHooks>& per_window, const DecoderBlock* override_weights = nullptr) const;
  /// The input hooks of stage `stage`'s first linear (Q, O, Gate, Down) on each window's x,
  /// without running the stage: transform_input on a copy, then capture_input, which sees
  /// what block_stage would multiply (e.g. to fit the group's quantization before running it).
  void block_stage_inputs(int b, int stage, const std::vector<BlockStageState*>& windows,
                          const std::vector<ForwardHooks>& per_window,
                          const DecoderBlock* override_weights = nullptr) const;
  /// Final RMSNorm + lm_head: T x hidden -> T x vocab.
  Matrix head(const Matrix& h) const;

  /// Appends new_tokens to the sequence held in `cache` (positions cache.length(), ...) and
  /// returns their logits (new x vocab). Hooks see the new tokens only (kv: their K/V before
  /// they join the cache). The cache grows geometrically (no per-token allocation); if the call
  /// throws, the cache keeps its previous length and contents.
  Matrix forward_incremental(const std::vector<int32_t>& new_tokens, KvCache& cache,
                             const ForwardHooks* hooks = nullptr) const;

  /// forward() of many windows (lengths may differ): OpenMP over windows, each window's BLAS
  /// calls single-threaded. Result i is bitwise equal to forward(windows[i]). Shared hooks
  /// must be thread-safe (see ForwardHooks).
  std::vector<Matrix> forward_batch(const std::vector<std::vector<int32_t>>& windows,
                                    const ForwardHooks* hooks = nullptr) const;
  /// Same, with one ForwardHooks per window (per_window.size() == windows.size()); window i's
  /// callbacks are only ever called by the one thread running window i, so they may write to
  /// per-window state without locks.
  std::vector<Matrix> forward_batch(const std::vector<std::vector<int32_t>>& windows,
                                    const std::vector<ForwardHooks>& per_window) const;

 private:
  struct Workspace;
  void check_block(const DecoderBlock& blk, const std::string& where) const;
  void embed_into(const std::vector<int32_t>& tokens, Matrix& h) const;
  void run_block(int b, const DecoderBlock& w, Matrix& h, int64_t pos0, KvCache* cache,
                 const ForwardHooks* hooks, bool parallel, Workspace& ws) const;
  void run_stage(int b, int stage, const DecoderBlock& w, Matrix& h, int64_t pos0, KvCache* cache,
                 const ForwardHooks* hooks, bool parallel, Workspace& ws) const;
  /// f(i, may_parallel, ws) for windows 0..n-1: serially with tile-parallel products when
  /// n < threads, else windows over the threads (one Workspace each, serial products).
  /// Stage `stage`'s input in ws: RMSNorm(h) with w's norm for stages 0 and 2 (in ws.x), the
  /// previous stage's output (ws.attn, ws.gate) for 1 and 3.
  const Matrix& stage_input(int stage, const DecoderBlock& w, const Matrix& h, Workspace& ws) const;
  void for_windows(long n, const std::function<void(long, bool, Workspace&)>& f) const;
  const DecoderBlock& checked_block(int b, const DecoderBlock* override_weights, std::size_t n_windows,
                                    std::size_t n_hooks) const;
  void run_attention(int b, int64_t pos0, KvCache* cache, const KvQuantizer* kvq, bool parallel,
                     Workspace& ws) const;
  /// run_attention of one new token through the quantizer's encoded path.
  void attention_encoded(int b, KvCache& cache, const KvQuantizer& kvq, Workspace& ws) const;
  void encode_cache(KvCache& cache, const ForwardHooks* hooks, int64_t n,
                    const std::vector<Matrix>& new_k_pre) const;
  Matrix run_head(const Matrix& h, bool parallel, Workspace& ws) const;
  Matrix run_window(const std::vector<int32_t>& tokens, const ForwardHooks* hooks,
                    bool parallel) const;

  const ModelWeights& w_;
};

}  // namespace ql
