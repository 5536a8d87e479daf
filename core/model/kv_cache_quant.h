// KV-cache quantization as attention sees it: a per-block quantizer that encodes keys and
// values in chunks of consecutive tokens, and the rule that says which cached tokens a query
// reads quantized.
//
// Read rule (KIVI, arXiv 2402.02750): keys are encoded in chunks of key_chunk() consecutive
// positions starting at multiples of it (1 = per token; > 1 = per-channel statistics over a
// group of tokens), values in chunks of value_chunk(). A chunk is encoded once it is complete
// and lies entirely before the residual window of the R = residual_length() most recent
// tokens; until then its tokens stay exact. So a query at position t reads the keys at
// positions j < exact_from(t, key_chunk(), R) quantized and the others exact, with
//   exact_from(t, c, R) = max(0, floor((t + 1 - R) / c) · c).
// R = 0 and c = 1 quantize every token, the usual perplexity convention. Windowed evaluation and
// incremental decoding follow the same rule, so they agree up to float32 product rounding.
//
// Keys are quantized before or after RoPE (key_stage()); values have no RoPE.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/model/rope.h"
#include "core/quantize.h"
#include "core/tensor.h"

namespace ql {

/// Where a kv hook sees keys/values, and where a KV quantizer quantizes keys: straight out of
/// k_proj (+bias), or after RoPE.
enum class KvStage { PreRope, PostRope };

enum class KvKind { Key, Value };

/// The encoded form of one chunk of rows (tokens x kv_dim) of K or V. Codes are kept one per
/// byte for speed (scalar quantizers: one per element; vector quantizers: their code indices);
/// bytes() counts them packed at the quantizer's bit width, plus scales (or norms) and
/// zero-points at 16 bits each (fp16 storage, as KIVI's kernels keep them; the fake
/// quantization itself uses float32 scales, as the FlatQuant reference does).
struct KvChunkCodes {
  KvKind kind = KvKind::Key;
  Index rows = 0, cols = 0;
  int bits = 0;
  std::vector<uint8_t> codes;  ///< scalar: rows x cols, row-major; else the quantizer's layout
  std::vector<float> scales, zeros;
  int64_t bytes() const;
};

/// Chunks of one kind whose codes and scales are laid out per row (vector quantizers) joined
/// into one chunk of all their rows, in order. ShapeError for mixed kinds, widths or bits.
KvChunkCodes concat_rows(const std::vector<const KvChunkCodes*>& chunks);

/// First position a query at t reads exact (see the read rule above).
int64_t kv_exact_from(int64_t t, int chunk, int residual);

class KvQuantizer {
 public:
  virtual ~KvQuantizer() = default;
  virtual KvStage key_stage() const = 0;
  virtual int key_chunk() const = 0;
  virtual int value_chunk() const = 0;
  virtual int residual_length() const = 0;
  /// Encode rows of K or V (rows a multiple of the kind's chunk, cols = kv_dim) / decode them
  /// back. decode(encode(X)) is the quantized X.
  virtual KvChunkCodes encode(KvKind kind, const Matrix& X) const = 0;
  virtual void decode(const KvChunkCodes& codes, Matrix& X) const = 0;
  /// Storage bits per element of encoded rows of `kind` (codes + scales + zeros).
  virtual double bits_per_element(KvKind kind, Index kv_dim) const = 0;
  /// One line for results and logs ("kv_rtn k4 v4 token/g32 R=0 post_rope").
  virtual std::string describe() const = 0;

  /// Optional attention over encoded tokens without decoding them (CommVQ's fast path).
  /// encoded_scores: raw scores q·k̂ (no 1/sqrt(d)) of the query heads (num_heads x head_dim,
  /// post-RoPE) against `keys` (one chunk holding positions 0 .. rows-1, as concat_rows
  /// builds it), out num_heads x rows. encoded_value_sum: out (num_heads x head_dim) =
  /// p · V̂ for probabilities p (num_heads x rows). Both return false (and leave out alone) when
  /// the quantizer has no such path; the default has none.
  virtual bool encoded_scores(const KvChunkCodes& keys, const RopeSpec& rope, const Matrix& queries,
                              Matrix& out) const {
    (void)keys, (void)rope, (void)queries, (void)out;
    return false;
  }
  virtual bool encoded_value_sum(const KvChunkCodes& values, const Matrix& p, Matrix& out) const {
    (void)values, (void)p, (void)out;
    return false;
  }

  /// X (T x kv_dim, rows = positions 0..T-1 of a window) with every complete chunk replaced by
  /// its quantized values; rows of an incomplete last chunk stay exact (no query reads them
  /// quantized).
  void fake_quant_complete_chunks(KvKind kind, Matrix& X) const;
  /// Bytes the cache of one block occupies once it holds n tokens (ready for the query at n):
  /// the complete chunks below min(n, exact_from(n, chunk, R)) encoded (KvChunkCodes::bytes() each), the other
  /// rows exact in fp16; keys and values together.
  int64_t cache_bytes(int64_t n, Index kv_dim) const;
  /// Average storage bits per cached K/V element of a sequence of n tokens (cache_bytes over
  /// 2 · n · kv_dim elements): the `kv_bits` summary metric.
  double kv_bits(int64_t n, Index kv_dim) const;
};

/// How a KV quantizer's errors show in attention, measured on captured windows (every complete
/// chunk of keys and values quantized, R ignored: the codebook/grid error itself):
///  - key_rel_mse, value_rel_mse: ‖X̂ − X‖²_F / ‖X‖²_F (keys at the quantizer's key stage);
///  - attn_score_rel_err: ‖S̃ − S‖_F / ‖S‖_F over the causal scores q·k (post-RoPE; decoded
///    pre-RoPE keys get RoPE at their position) of every query head;
///  - attn_topk_agreement: mean over heads and queries with at least top_k keys of
///    |top_k(S) ∩ top_k(S̃)| / top_k.
struct KvErrorStats {
  double key_rel_mse = 0, value_rel_mse = 0, attn_score_rel_err = 0, attn_topk_agreement = 1;
};
/// Window w of the stacks holds window_rows[w] rows at positions 0..; windows
/// [first_window, end) are measured. q: post-RoPE queries (rows x num_heads·head_dim).
KvErrorStats measure_kv_error(const KvQuantizer& kq, int num_heads, int num_kv_heads, int head_dim, const RopeSpec& rope,
                              const Matrix& k_pre, const Matrix& k_post, const Matrix& v, const Matrix& q,
                              const std::vector<Index>& window_rows, std::size_t first_window, int top_k);

/// Scalar asymmetric KV quantization (the kv_rtn baseline; KIVI and FlatQuant's settings).
struct ScalarKvSpec {
  int key_bits = 4, value_bits = 4;  ///< 1..8
  /// Keys per token (one grid per token and channel group, as values) or per channel (one grid
  /// per channel over a chunk of token_group tokens, KIVI's keys).
  bool keys_per_channel = false;
  int group_size = 0;     ///< channels per grid for per-token grids; 0 = head_dim
  int token_group = 32;   ///< tokens per grid (and chunk) for per-channel keys
  int residual_length = 0;
  KvStage key_stage = KvStage::PostRope;
  /// Learned range ratios of the per-token grids (FlatQuant's LAC on the KV cache, trained by
  /// a block step): each grid's lo and hi are multiplied by lo and hi before the grid is built.
  /// Per-channel keys take no key clipping (ShapeError).
  ActClip key_clip, value_clip;
};

/// Grids: asymmetric, range [min(x, 0)·clip.lo, max(x, 0)·clip.hi] ([-1, 1] when both are 0),
/// scale = (hi - lo)/(2^b - 1), zero = round(-lo/scale), through core/quantize.h. kv_dim must be a multiple of
/// the channel group (ShapeError).
std::unique_ptr<KvQuantizer> make_scalar_kv_quantizer(const ScalarKvSpec& spec, int head_dim,
                                                      Index kv_dim);

}  // namespace ql
