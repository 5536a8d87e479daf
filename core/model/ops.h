// The operations of a LLaMA-family decoder block as named functions (llm.c's layout), used by
// the Transformer and by anything that needs one op on its own (KV-cache quantizers need RoPE
// and its inverse; block-local training needs each op's forward with what its backward reads).
//
// Layout: activations are row-major T x d float32 matrices (row = token). Head h of a
// T x (n_heads*head_dim) matrix is columns [h*head_dim, (h+1)*head_dim). RoPE is the rotate-half
// form: dimension i of a head is paired with i + head_dim/2.
//
// Determinism: every product is cut into fixed tiles (kPanelRows token rows x kTileCols output
// columns; attention in chunks of kAttnRows query rows per head), each tile one single-threaded
// tile call of core/linalg.h, and every reduction has a fixed order; so results depend on the
// shapes and the numeric mode only, never on the thread count or on `parallel`, which only
// decides whether tiles are spread over the OpenMP threads. Elementary functions come from
// core/detmath. Each op may be called from inside an OpenMP region with parallel = false.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/linalg.h"
#include "core/model/rope.h"
#include "core/tensor.h"

namespace ql {

/// Output columns per GEMM tile (with kPanelRows token rows from core/linalg.h). Fixed:
/// changing it changes results in the last bits.
constexpr Index kTileCols = 128;
/// Query rows per attention task (one head x one chunk of query rows). Fixed, as kTileCols.
constexpr Index kAttnRows = 128;
/// Inputs shorter than this many rows run on one thread: their products are too small to
/// amortise waking the other threads. Scheduling only; the bits are the same either way.
constexpr Index kMinParallelRows = 16;

/// One linear product Y = X Wᵀ (+ b): X is T x d_in, W d_out x d_in (Hugging Face layout),
/// b empty or d_out; Y is resized to T x d_out. A bias is written into each tile first and
/// accumulated with beta = 1, as torch's addmm does.
struct LinearJob {
  const Matrix* X;
  const Matrix* W;
  const Vector* b;  ///< nullptr or empty: no bias
  Matrix* Y;
};

/// Runs n_jobs independent linears in one parallel region, so that small products that read
/// one input (q/k/v) keep every core busy.
void linear_forward(const LinearJob* jobs, int n_jobs, bool parallel);

/// The MLP's gate/up products fused with SwiGLU: gate.Y <- silu(X Wgᵀ) ⊙ (X Wuᵀ) with
/// silu(x) = x / (1 + exp(-x)); up.Y keeps X Wuᵀ (what a backward pass needs besides the
/// pre-activation, which it can recompute). Same tiles as linear_forward.
void swiglu_forward(const LinearJob& gate, const LinearJob& up, bool parallel);

/// Hugging Face LlamaRMSNorm in float32: out = w ⊙ (x · rstd), rstd = 1/sqrt(mean(x²) + eps) per
/// row, the mean of squares accumulated in double in a fixed order and rounded once. When
/// `rstd` is given it receives the T per-row factors (what the backward pass needs).
void rms_norm_forward(const Matrix& h, const Vector& w, float eps, Matrix& out,
                      Vector* rstd = nullptr);

/// Qwen3's per-head RMSNorm: every head_dim-wide head of X (T x n_heads*head_dim) normalised
/// as rms_norm_forward with the head_dim weights w, in place.
void head_rms_norm_forward(Matrix& X, int n_heads, int head_dim, const Vector& w, float eps);

/// inv_freq (head_dim/2 floats) of `rope` for a forward whose largest position is seq_len − 1:
/// the default frequencies in float32 as HF (1 / float32(theta)^(float(2i)/head_dim)); a scaling
/// applied to them in double and rounded once.
std::vector<float> rope_inv_freq(const RopeSpec& rope, int head_dim, int64_t seq_len);

/// cos/sin of the RoPE angles for positions pos0 .. pos0+T-1, T x head_dim/2 each, rounded as
/// HF's LlamaRotaryEmbedding: angle = float(pos) · inv_freq_i in float32 (one rounding), then
/// cos/sin of that float angle; inv_freq from rope_inv_freq with seq_len = pos0 + T.
struct RopeTables {
  Matrix cos, sin;
  int64_t pos0 = -1;
  Index rows = -1;
};
void rope_tables(int64_t pos0, Index T, int head_dim, const RopeSpec& rope, RopeTables& out);

/// Rotate-half RoPE in place on every head of X (T x n_heads*head_dim), row t at the tables'
/// row t: out_i = x_i cos_i - x_{i+half} sin_i, out_{i+half} = x_{i+half} cos_i + x_i sin_i.
void rope_forward(Matrix& X, int n_heads, int head_dim, const RopeTables& tab);
/// The inverse rotation (the transpose): x_i = y_i cos_i + y_{i+half} sin_i,
/// x_{i+half} = y_{i+half} cos_i - y_i sin_i. rope_inverse(rope_forward(X)) == X to float32
/// rounding (cos² + sin² = 1 holds only to rounding). It is also RoPE's backward pass.
void rope_inverse(Matrix& X, int n_heads, int head_dim, const RopeTables& tab);

/// Causal grouped-query attention of T new queries at positions past .. past+T-1 against keys
/// and values of positions 0 .. past+T-1 (rows of K/V with row stride ld_kv; kv head g =
/// columns [g*head_dim, (g+1)*head_dim)). Query head j uses kv head j / (n_heads/n_kv_heads):
/// out_j = softmax(Q_j K_gᵀ / sqrt(head_dim), causal) V_g. out is resized to T x
/// n_heads*head_dim. The probabilities are not kept: a backward pass recomputes them per chunk
/// from Q and K, which costs one extra product and saves T x T floats per head.
///
/// With `mix`, a query at position t reads the keys at positions j < kv_exact_from(t,
/// key_chunk, residual) from mix->Kq instead of K, and the values below kv_exact_from(t,
/// value_chunk, residual) from mix->Vq instead of V (same layout and ld_kv): the read rule of a
/// quantized KV cache (core/model/kv_cache_quant.h). Costs a second score product and a second
/// value product per task.
struct KvMix {
  const float* Kq;
  const float* Vq;
  int key_chunk = 1, value_chunk = 1, residual = 0;
};
void attention_forward(const Matrix& Q, const float* K, const float* V, Index ld_kv, int64_t past,
                       int n_heads, int n_kv_heads, int head_dim, bool parallel, Matrix& out,
                       const KvMix* mix = nullptr);

}  // namespace ql
